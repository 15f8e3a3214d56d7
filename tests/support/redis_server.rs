//! A real `redis-server` for one test: listens on a unix socket in its own temporary
//! directory (no TCP port, so parallel tests never collide), appends every write to its AOF, and
//! can be stopped and started again on the same socket and directory so the data survives.
//! Dropping it kills the process. Without `redis-server` installed the test panics: it never
//! skips silently.
//!
//! Also used by `benches/ledger.rs` through `#[path]`, so it depends on std and `tempfile` only.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server gets to answer PING after starting.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisServer {
    dir: tempfile::TempDir,
    socket: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a fresh server and waits until it answers PING.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cg-redis-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory for redis: {e}"));
        let socket = dir.path().join("redis.sock");
        let mut server = Self {
            dir,
            socket,
            child: None,
        };
        server.start_again();
        server
    }

    /// `redis+unix:///…/redis.sock`
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Shuts the server down cleanly (SIGTERM: the AOF is flushed) and waits for it to exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id().to_string();
        let termed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if termed {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    let _ = std::fs::remove_file(&self.socket);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT); it then runs whatever was queued meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let Some(child) = &self.child else {
            panic!("redis-server is not running");
        };
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill {signal}: {e}"));
        assert!(status.success(), "kill {signal} failed");
    }

    /// Starts the server (again) on the same socket and directory, reloading its AOF.
    pub fn start_again(&mut self) {
        if self.child.is_some() {
            return;
        }
        let log = self.dir.path().join("redis.log");
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&self.socket)
            .arg("--unixsocketperm")
            .arg("700")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("yes")
            .arg("--appendfsync")
            .arg("everysec")
            .arg("--maxmemory-policy")
            .arg("noeviction")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .arg("--daemonize")
            .arg("no");
        let mut child = spawn_redis_server(&mut cmd);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(&self.socket) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "redis-server exited during start ({status}); log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-server did not answer PING within {START_TIMEOUT:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
    }
}

/// One PING over the socket, answered with `+PONG`.
fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL also ends a paused process.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Spawns `cmd` (a `redis-server` with its arguments set) with no stdin, stdout or stderr; panics
/// with an install hint when `redis-server` is not on PATH.
pub fn spawn_redis_server(cmd: &mut Command) -> Child {
    match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server is not installed (not found on PATH); these tests need a real \
             Redis: install it (e.g. `apt-get install redis-server`)"
        ),
        Err(e) => panic!("cannot start redis-server: {e}"),
    }
}
