//! A throwaway `redis-server` on a free loopback port, for tests and
//! benchmarks that need a real Redis (no persistence; killed on drop).

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A `redis-server` on a free loopback port (no persistence); killed on drop.
///
/// `redis-server` must be on PATH (or named by `CACHEROUTE_REDIS_SERVER`): without it
/// the tests fail, they do not skip.
pub struct LocalRedis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl LocalRedis {
    pub fn start() -> Self {
        let bin =
            std::env::var("CACHEROUTE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        if Command::new(&bin)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            panic!(
                "`{bin}` not found: a real Redis server is needed here. Install it \
                 (e.g. `apt-get install -y redis-server`) or set CACHEROUTE_REDIS_SERVER"
            );
        }
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cacheroute-redis-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for _attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new(&bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken meanwhile: try another
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self {
                        child: Some(child),
                        port,
                        dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not come up");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stop the server (SIGKILL): everything in it is lost.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
