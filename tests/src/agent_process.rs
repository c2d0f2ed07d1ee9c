//! `portcullis agent` as a process of its own, on a lab's files and pins:
//! what a test kills with SIGKILL and restarts.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use portcullis_agent::lab::Lab;

const TIMEOUT: Duration = Duration::from_secs(30);

/// `portcullis agent` as its own process, on a lab's files and pins, so it
/// can be killed with SIGKILL. Its log lines are collected as they come.
pub struct AgentProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl AgentProcess {
    pub fn start(lab: &Lab, state_dir: &Path) -> Self {
        Self::start_with(lab, state_dir, &[])
    }

    /// With more `portcullis agent` arguments (identity, for the mesh).
    pub fn start_with(lab: &Lab, state_dir: &Path, extra: &[&std::ffi::OsStr]) -> Self {
        let mut args = lab.agent_args();
        args.extend(extra.iter().map(|a| a.to_os_string()));
        Self::spawn(args, state_dir)
    }

    /// `portcullis` with these arguments (`agent` and its flags), no admin
    /// endpoint, and state in `state_dir`.
    pub fn spawn(args: Vec<std::ffi::OsString>, state_dir: &Path) -> Self {
        let mut command = Command::new(portcullis_agent::lab::portcullis_exe().unwrap());
        command
            .args(args)
            .args(["--admin-addr", "none", "--state-dir"])
            .arg(state_dir)
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped());
        // SAFETY: prctl(2) only, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // An agent outliving a killed test run would hold its lab's
                // pins, and every later run of that lab would be refused.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let mut child = command.spawn().expect("starting portcullis agent");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        Self { child, log }
    }

    /// Waits for a log line, after the first `after` lines, for which `want`
    /// holds; returns its index.
    pub async fn wait_line(&self, after: usize, what: &str, want: impl Fn(&str) -> bool) -> usize {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            {
                let log = self.log.lock().unwrap();
                if let Some(i) = log.iter().skip(after).position(|l| want(l)) {
                    return after + i;
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}; the agent logged:\n{}",
                    log.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the next pass that reached the kernel.
    pub async fn wait_applied(&self, after: usize) -> usize {
        self.wait_line(after, "a pass to reach the kernel", |l| {
            l.contains("policy applied")
        })
        .await
    }

    /// Waits for the process to end by itself; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit; it logged:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn lines(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    pub fn kill(mut self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let status = self.child.wait().unwrap();
        if signal == libc::SIGKILL {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(libc::SIGKILL));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
