//! Hostile guests (issue 8): a real guest writes crafted frames on a raw
//! socket (`enilab-agent attack`) while two other guests run iperf3 between
//! them. Every attack must be contained (dropped by the switch, under the
//! reason it deserves, counted on the attacker's interface) and the
//! others' traffic must go on; their throughput during each attack is
//! printed beside the baseline (no timed assertion: TCG on a shared host).
//!
//! One parameterised function per scenario, thin `#[test]` wrappers; the
//! harness is `enilab_tests::ApiDaemon`. Only 10.x VPC addresses, the
//! metadata address and loopback are addressed.

use std::time::Duration;

use enilab_control::api::bench::extract;
use enilab_tests::*;

const BUDGET: Duration = Duration::from_secs(420);
const BOOT: Duration = Duration::from_secs(120);
const SHORT: Duration = Duration::from_secs(30);
/// Seconds each attack (and the iperf3 run beside it) lasts.
const ATTACK_S: u64 = 4;

#[derive(Debug, Clone, Copy)]
enum Attack {
    /// Random source MACs.
    SpoofMac,
    /// Other addresses of the subnet as source (the victims' among them).
    SpoofIp,
    /// Someone else's address toward the metadata service.
    ImdsAsAnother,
    /// Broadcast UDP, Ethernet and IP.
    Broadcast,
    /// ARP requests for every address of the /24.
    ArpFlood,
    /// Truncated, lying and random IPv4.
    Malformed,
    /// UDP to an address of another VPC.
    OtherVpc,
    /// UDP to the host's loopback.
    Host,
    /// New flows to a victim, as fast as the guest can.
    NewFlows,
}

impl Attack {
    fn kind(self) -> &'static str {
        match self {
            Attack::SpoofMac => "spoof-mac",
            Attack::SpoofIp | Attack::ImdsAsAnother => "spoof-ip",
            Attack::Broadcast => "broadcast",
            Attack::ArpFlood => "arp-flood",
            Attack::Malformed => "malformed",
            Attack::OtherVpc | Attack::Host => "to-addr",
            Attack::NewFlows => "new-flows",
        }
    }

    /// The drop counters of the attacker's interface the attack must
    /// raise (at least one of them, together by most of what was sent).
    fn reasons(self) -> &'static [&'static str] {
        match self {
            Attack::SpoofMac => &["spoofed_mac"],
            Attack::SpoofIp | Attack::ImdsAsAnother => &["source_check"],
            Attack::Broadcast => &["broadcast"],
            // Requests for addresses nobody has are dropped; the others
            // are answered (counted as ARP replies).
            Attack::ArpFlood => &["no_route", "broadcast"],
            Attack::Malformed => &["malformed", "no_route", "unsupported", "broadcast"],
            Attack::OtherVpc | Attack::Host => &["no_route"],
            Attack::NewFlows => &[],
        }
    }
}

fn daemon(tag: &str) -> Option<ApiDaemon> {
    let env = require_guests()?;
    let bin = require(REQUIRE_GUESTS, enilab_bin())?;
    eprintln!(
        "[{tag}] accelerator {} ({})",
        env.accel.accel, env.accel.reason
    );
    Some(ApiDaemon::start(bin, tag, BUDGET, &[]))
}

/// The attacker's interface counters from the daemon's status.
fn port_stats(d: &ApiDaemon, instance: &str) -> serde_json::Value {
    let st = d.status();
    st["driver"]["devices"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["instance"] == instance))
        .map(|x| x["stats"].clone())
        .unwrap_or_else(|| panic!("no device of {instance}: {st}"))
}

fn num(v: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0)
}

fn hostile(tag: &str, attacks: &[Attack]) {
    let Some(d) = daemon(tag) else { return };
    let vpc = d.open_vpc("10.0.0.0/16");
    let subnet = d.subnet(&vpc, "10.0.1.0/24");
    // Another VPC with an instance address the attacker aims at.
    let other = d.get("CreateVpc", &[("CidrBlock", "10.1.0.0/16")], "vpcId");
    let other_subnet = d.subnet(&other, "10.1.1.0/24");
    let other_eni = d.ok("CreateNetworkInterface", &[("SubnetId", &other_subnet)]);
    let other_ip = extract(&other_eni, "privateIpAddress")
        .expect("other VPC address")
        .to_string();

    let guests = d.boot(&subnet, 3, BOOT);
    let (attacker, attacker_ip) = &guests[0];
    let (sender, sender_ip) = &guests[1];
    let (receiver, receiver_ip) = &guests[2];
    d.sh_ok(receiver, "iperf3 -s -D -p 5201", SHORT);
    let iperf = |secs: u64| -> f64 {
        let out = d.sh_ok(
            sender,
            &format!("iperf3 -c {receiver_ip} -t {secs} -J"),
            SHORT * 2,
        );
        let j: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        j["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
    };
    // Every instance's card 0 is an aggregate of its one interface, with
    // the type's bandwidth (status lists what the switch enforces).
    let st = d.status();
    for (id, _) in &guests {
        let card = st["card_allowances"]
            .as_array()
            .and_then(|v| v.iter().find(|c| c["instance"] == id.as_str()))
            .unwrap_or_else(|| panic!("no card aggregate of {id}: {}", st["card_allowances"]));
        assert_eq!(card["card"], 0, "{card}");
        assert_eq!(card["ports"].as_array().map(Vec::len), Some(1), "{card}");
        assert!(card["limits"]["bw_out_bps"].as_u64() > Some(0), "{card}");
    }
    let baseline = iperf(ATTACK_S);
    eprintln!("[{tag}] victims' TCP baseline {:.0} Mbit/s", baseline / 1e6);
    assert!(baseline > 0.0, "no baseline traffic");

    // Whether the attacker used up its connection-tracking allowance: its
    // own new flows then wait for the flood's entries to expire.
    let mut exhausted = false;
    for &attack in attacks {
        let dst = match attack {
            Attack::ImdsAsAnother => "169.254.169.254".to_string(),
            Attack::OtherVpc => other_ip.clone(),
            Attack::Host => "127.0.0.1".to_string(),
            _ => receiver_ip.clone(),
        };
        let before = port_stats(&d, attacker);
        let script = format!(
            "enilab-agent attack {} eth0 {ATTACK_S} {attacker_ip} {dst}",
            attack.kind()
        );
        let agent = d.agent_socket(attacker);
        let flood = std::thread::spawn(move || {
            let mut c = enilab_control::agent::AgentClient::connect(agent).expect("agent");
            c.exec_capture(&["sh", "-c", &script], Duration::from_secs(60))
                .expect("attack")
        });
        let during = iperf(ATTACK_S);
        let out = flood.join().expect("attack thread");
        assert!(
            out.success(),
            "{attack:?}: code {} signal {:?} timed out {}: {} {}",
            out.code,
            out.signal,
            out.timed_out,
            out.stdout_str(),
            out.stderr_str()
        );
        let sent: u64 = out
            .stdout_str()
            .trim()
            .strip_prefix("sent ")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        // Frames still in flight settle.
        std::thread::sleep(Duration::from_millis(500));
        let after = port_stats(&d, attacker);
        let tx = num(&after, &["tx_packets"]) - num(&before, &["tx_packets"]);
        let dropped: u64 = attack
            .reasons()
            .iter()
            .map(|r| num(&after, &["drops", r]) - num(&before, &["drops", r]))
            .sum();
        let arp = num(&after, &["arp_replies"]) - num(&before, &["arp_replies"]);
        let flows = num(&after, &["new_flows"]) - num(&before, &["new_flows"]);
        eprintln!(
            "[{tag}] {attack:?}: sent {sent}, switch saw {tx}, dropped as {:?}: {dropped}, \
             arp replies {arp}, new flows {flows}; victims {:.0} Mbit/s ({:.0}% of baseline)",
            attack.reasons(),
            during / 1e6,
            100.0 * during / baseline
        );
        assert!(sent > 100, "{attack:?}: the attack sent only {sent} frames");
        assert!(during > 0.0, "{attack:?}: the victims' traffic stopped");
        // Most of what was sent reached the switch (the guest's ring may
        // drop some when full) and was contained.
        assert!(
            tx * 10 >= sent * 5,
            "{attack:?}: the switch saw {tx} of {sent}"
        );
        match attack {
            Attack::NewFlows => {
                // Admitted (the group allows the VPC): tracked, never
                // more flows than frames, and the victim's own established
                // stream went on (above).
                assert!(
                    flows > 0 && flows <= tx,
                    "{attack:?}: {flows} flows of {tx}"
                );
                // The flood is charged to the attacker's allowance, never
                // beyond it, and not to the victim's: the victim still
                // opens new flows of its own.
                let tracked = num(&after, &["conntrack_tracked"]);
                let available = num(&after, &["conntrack_allowance_available"]);
                let over = num(&after, &["conntrack_allowance_exceeded"])
                    - num(&before, &["conntrack_allowance_exceeded"]);
                eprintln!(
                    "[{tag}] {attack:?}: attacker tracks {tracked}, {available} left, \
                     {over} new flows over its allowance"
                );
                assert!(
                    after["conntrack_allowance_available"].is_u64(),
                    "{attack:?}: the attacker has no conntrack allowance: {after}"
                );
                exhausted |= over > 0;
                let victim = port_stats(&d, receiver);
                assert_eq!(
                    num(&victim, &["conntrack_allowance_exceeded"]),
                    0,
                    "{attack:?}: the victim's allowance was charged: {victim}"
                );
                assert!(
                    wait_until(Duration::from_secs(15), || d.pings(receiver, sender_ip)),
                    "{attack:?}: the victim cannot open a new flow: {victim}"
                );
            }
            Attack::ArpFlood => assert!(
                dropped + arp >= tx * 9 / 10,
                "{attack:?}: {dropped} dropped + {arp} answered of {tx}"
            ),
            _ => assert!(
                dropped >= tx * 9 / 10,
                "{attack:?}: only {dropped} of {tx} dropped as {:?}: {after}",
                attack.reasons()
            ),
        }
    }
    // The attacker itself still works normally: its queues did not stall.
    // After using up its conntrack allowance, its new flows wait until the
    // flood's one-way UDP entries expire (30 s) and are swept (<= 16 s).
    let patience = Duration::from_secs(if exhausted { 75 } else { 15 });
    let ok = wait_until(patience, || d.pings(attacker, receiver_ip));
    assert!(
        ok,
        "the attacker's own traffic stopped; in the guest:\n{}\nits interface: {}",
        d.sh(
            attacker,
            "ip -s link show eth0; ip neigh; cat /proc/net/dev",
            SHORT
        )
        .stdout_str(),
        port_stats(&d, attacker)
    );
}

#[test]
fn hostile_guest_spoofing_and_floods() {
    hostile(
        "hostile-l2",
        &[
            Attack::SpoofMac,
            Attack::SpoofIp,
            Attack::Broadcast,
            Attack::ArpFlood,
            Attack::Malformed,
        ],
    );
}

#[test]
fn hostile_guest_reaching_out() {
    hostile(
        "hostile-reach",
        &[
            Attack::ImdsAsAnother,
            Attack::OtherVpc,
            Attack::Host,
            Attack::NewFlows,
        ],
    );
}
