//! One unix socket per ENI: accept a frontend, serve its session, and on
//! disconnect reset the device and accept the next one (guest reboot, QEMU
//! restart) without restarting anything.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::card::Card;
use crate::net::NetDevice;
use crate::vhost_user::{Backend, Session, SessionEnd};
use crate::BackendError;

/// A running ENI socket.
pub struct EniServer {
    dev: Arc<NetDevice>,
    card: Arc<Card>,
    path: PathBuf,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    stopped: bool,
}

impl EniServer {
    /// Bind `path` and serve `dev` on `card`.
    pub fn start(path: &Path, dev: Arc<NetDevice>, card: Arc<Card>) -> Result<Self, BackendError> {
        let listener = bind(path)?;
        card.attach(&dev)?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(BackendError::Io)?);
        let thread = {
            let dev = dev.clone();
            let stop = stop.clone();
            let name = format!("eni-{}", dev.config().eni_id);
            std::thread::Builder::new()
                .name(name.chars().take(15).collect())
                .spawn(move || serve(listener, &dev, &stop))
                .map_err(BackendError::Io)?
        };
        Ok(EniServer {
            dev,
            card,
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
            stopped: false,
        })
    }

    pub fn device(&self) -> &Arc<NetDevice> {
        &self.dev
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Close the socket, end any session and stop serving the device.
    /// Idempotent: a second call (e.g. the drop of a server stopped for a
    /// card restart) must not unpublish the port or remove the socket of
    /// the server that replaced it.
    pub fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.card.detach(&self.dev);
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for EniServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bind(path: &Path) -> Result<UnixListener, BackendError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(BackendError::SocketInUse(path.to_path_buf()));
        }
        // A stale socket left by a process that died.
        std::fs::remove_file(path).map_err(|e| BackendError::Bind(path.to_path_buf(), e))?;
    }
    UnixListener::bind(path).map_err(|e| BackendError::Bind(path.to_path_buf(), e))
}

/// Wait until `fd` is readable or `stop` fires. Returns false on stop.
fn wait_readable(fd: i32, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the whole call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        return true;
    }
}

fn serve(listener: UnixListener, dev: &Arc<NetDevice>, stop: &EventFd) {
    let eni = dev.config().eni_id.clone();
    while wait_readable(listener.as_raw_fd(), stop) {
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(%eni, error = %e, "accept failed");
                continue;
            }
        };
        let n = dev.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(%eni, session = n, "frontend connected");
        let mut session = Session::new(sock, &**dev);
        let end = loop {
            if !wait_readable(session.socket().as_raw_fd(), stop) {
                dev.reset();
                return;
            }
            match session.serve_one() {
                Ok(true) => {}
                Ok(false) => break SessionEnd::Disconnected,
                Err(e) => break SessionEnd::Error(e),
            }
        };
        match end {
            SessionEnd::Disconnected => tracing::info!(%eni, "frontend disconnected"),
            SessionEnd::Error(e) => {
                tracing::warn!(%eni, error = %e, "vhost-user session ended by a protocol error")
            }
        }
        dev.reset();
    }
    dev.reset();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Datapath, DeviceConfig};

    fn cfg(port: u32) -> DeviceConfig {
        DeviceConfig {
            eni_id: format!("eni-t{port}"),
            port,
            mac: [2, 0, 0, 0, 0, port as u8],
            mtu: 1500,
            queue_pairs: 1,
        }
    }

    #[test]
    fn socket_in_use_is_a_clear_error_and_stale_sockets_are_replaced() {
        let dir = std::env::temp_dir().join(format!("enilab-srv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("e.sock");
        let dp = Datapath::new(enilab_switch::Switch::new(), 1);
        let first = dp.add_eni(&path, cfg(1), 0).unwrap();
        let err = dp
            .add_eni(&path, cfg(2), 0)
            .err()
            .expect("second bind must fail");
        assert!(matches!(err, BackendError::SocketInUse(_)), "{err}");
        assert!(err.to_string().contains("in use"));
        drop(first);
        // A stale socket file (nobody listening) is replaced.
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(_l);
        let again = dp.add_eni(&path, cfg(3), 0);
        assert!(again.is_ok());
        drop(again);
        dp.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_frontend_can_reconnect_without_a_restart() {
        let dir = std::env::temp_dir().join(format!("enilab-rc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("e.sock");
        let dp = Datapath::new(enilab_switch::Switch::new(), 1);
        let srv = dp.add_eni(&path, cfg(1), 0).unwrap();
        for round in 1..=3u64 {
            let fe = vhost::vhost_user::Frontend::connect(&path, 2).unwrap();
            use vhost::VhostBackend;
            let f = fe.get_features().unwrap();
            assert!(f & (1 << 32) != 0, "VERSION_1 offered");
            drop(fe);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while srv.device().sessions.load(Ordering::Relaxed) < round {
                assert!(
                    std::time::Instant::now() < deadline,
                    "session {round} not seen"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        drop(srv);
        dp.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_card_restarts_under_its_socket_and_leaks_no_threads() {
        let dir = std::env::temp_dir().join(format!("enilab-cr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("e.sock");
        let dp = Datapath::new(enilab_switch::Switch::new(), 2);
        let mut srv = dp.add_eni(&path, cfg(1), 0).unwrap();
        assert_eq!(dp.worker_threads(), 2);
        for round in 0..3 {
            srv.stop();
            let old = srv;
            assert!(dp.restart_card(0), "round {round}: card 0 was running");
            assert_eq!(dp.worker_threads(), 0, "round {round}: old workers joined");
            srv = dp.add_eni(&path, cfg(1), 0).unwrap();
            // Dropping the stopped server leaves the new one alone.
            drop(old);
            assert!(path.exists(), "round {round}: the new socket stays");
            assert_eq!(dp.worker_threads(), 2, "round {round}: a fresh group");
            let fe = vhost::vhost_user::Frontend::connect(&path, 2).unwrap();
            use vhost::VhostBackend;
            assert!(fe.get_features().unwrap() & (1 << 32) != 0);
        }
        assert!(!dp.restart_card(7), "no card 7");
        drop(srv);
        dp.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
