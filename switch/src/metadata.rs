//! The addresses of the instance metadata service (IMDS) path: the
//! contract between the switch and the namespace the metadata server runs
//! in.
//!
//! The server sits behind one TAP port ([`MetadataConfig`]). VPCs may reuse
//! each other's addresses, so the switch replaces a guest's source address
//! with a client address that names its port and which of the port's
//! addresses it used: `100.64.0.0 + (port << 8 | addr_index)`, inside
//! [`METADATA_CLIENT_NET`]. The namespace routes that block through
//! [`METADATA_GATEWAY`].
//!
//! [`MetadataConfig`]: crate::MetadataConfig

use std::net::Ipv4Addr;

use crate::PortId;

/// The address guests reach instance metadata at.
pub const IMDS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The switch's own MAC on the metadata port.
pub const METADATA_MAC: [u8; 6] = [0x02, 0xe1, 0x1a, 0x00, 0x00, 0x03];

/// The next hop the namespace routes client addresses through; the switch
/// answers ARP for it with [`METADATA_MAC`].
pub const METADATA_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);

/// The block client addresses are taken from (RFC 6598 shared space).
pub const METADATA_CLIENT_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);

/// Bits of a client address below the port: the address index.
const INDEX_BITS: u32 = 8;

/// Host bits of [`METADATA_CLIENT_NET`].
const HOST_BITS: u32 = 32 - METADATA_CLIENT_NET.1 as u32;

/// The client address that stands for address `addr_index` of `port`
/// (0 the primary IP, 1.. the secondary IPs in `PortConfig` order). `None`
/// when `port` does not fit the block (`port >= 2^14`).
pub fn metadata_client_addr(port: PortId, addr_index: u8) -> Option<Ipv4Addr> {
    if port >= 1 << (HOST_BITS - INDEX_BITS) {
        return None;
    }
    let host = (port << INDEX_BITS) | u32::from(addr_index);
    Some(Ipv4Addr::from(u32::from(METADATA_CLIENT_NET.0) | host))
}

/// The port and address index a client address stands for; `None` outside
/// [`METADATA_CLIENT_NET`].
pub fn decode_metadata_client(addr: Ipv4Addr) -> Option<(PortId, u8)> {
    let bits = u32::from(addr);
    let host_mask = (1u32 << HOST_BITS) - 1;
    if bits & !host_mask != u32::from(METADATA_CLIENT_NET.0) {
        return None;
    }
    let host = bits & host_mask;
    Some((host >> INDEX_BITS, (host & 0xff) as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_encode_port_and_index() {
        // (port, index, address)
        let rows: &[(PortId, u8, [u8; 4])] = &[
            (0, 0, [100, 64, 0, 0]),
            (1, 0, [100, 64, 1, 0]),
            (1, 2, [100, 64, 1, 2]),
            (258, 7, [100, 65, 2, 7]),
            (4095, 255, [100, 79, 255, 255]),
            ((1 << 14) - 1, 255, [100, 127, 255, 255]),
        ];
        for &(port, index, addr) in rows {
            let addr = Ipv4Addr::from(addr);
            assert_eq!(
                metadata_client_addr(port, index),
                Some(addr),
                "{port}/{index}"
            );
            assert_eq!(decode_metadata_client(addr), Some((port, index)), "{addr}");
        }
        assert_eq!(metadata_client_addr(1 << 14, 0), None);
        assert_eq!(metadata_client_addr(u32::MAX, 0), None);
    }

    #[test]
    fn addresses_outside_the_block_do_not_decode() {
        for a in [
            [100, 63, 255, 255],
            [100, 128, 0, 0],
            [10, 64, 1, 0],
            [169, 254, 169, 254],
            [0, 0, 0, 0],
            [255, 255, 255, 255],
        ] {
            assert_eq!(decode_metadata_client(Ipv4Addr::from(a)), None, "{a:?}");
        }
    }

    #[test]
    fn every_port_and_index_round_trips() {
        for port in 0..crate::MAX_PORTS as PortId {
            for index in [0u8, 1, 42, 255] {
                let addr = metadata_client_addr(port, index).expect("port in range");
                assert_eq!(decode_metadata_client(addr), Some((port, index)));
            }
        }
    }
}
