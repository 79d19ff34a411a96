//! `Netns`: one network namespace, and the ways to run something inside it: a command
//! (`ip netns exec`), a closure on a thread that entered it (setns(2)), a tokio runtime
//! whose every thread entered it ([`NsRuntime`]), or a test of the current test binary as
//! a child process. A socket belongs to the namespace of the thread that made it, so code
//! run these ways talks only on the namespace's network.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use anyhow::Context;
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use crate::run;

/// A network namespace made by a [`Lab`](crate::Lab) (a name; the lab deletes it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub(crate) fn new(name: String) -> Self {
        Self { name }
    }

    /// Its name (as `ip netns` lists it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <this> <args>`; its output.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Runs `args` (program first) inside this namespace; its output.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }

    /// A command that runs `program` inside this namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Starts test `test` of the running test binary (an `#[ignore]`d one, run with
    /// `--exact --ignored --nocapture` on one thread) inside this namespace with `env` set,
    /// its standard streams piped.
    pub fn test_child(&self, test: &str, env: &[(&str, String)]) -> anyhow::Result<Child> {
        let exe = std::env::current_exe().context("finding the test binary")?;
        let mut cmd = self.command(exe);
        cmd.args([
            "--exact",
            test,
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn()
            .with_context(|| format!("starting {test} in {}", self.name))
    }

    /// The namespace's file (`/run/netns/<name>`), to enter it.
    fn file(&self) -> anyhow::Result<File> {
        let path = format!("/run/netns/{}", self.name);
        File::open(&path).with_context(|| format!("opening {path}"))
    }

    /// Moves the calling thread into this namespace (sockets it makes from now on are
    /// the namespace's; threads it starts inherit it).
    pub fn enter_current_thread(&self) -> anyhow::Result<()> {
        let file = self.file()?;
        move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
            .with_context(|| format!("entering network namespace {}", self.name))
    }

    /// Runs `f` on a new thread inside this namespace and returns what it returns (a panic
    /// in `f` is passed on).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        std::thread::scope(|s| {
            let thread = s.spawn(|| {
                self.enter_current_thread()?;
                Ok(f())
            });
            match thread.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A multi-threaded tokio runtime (`workers` worker threads, I/O and time on) whose
    /// every thread, workers and blocking ones, runs inside this namespace.
    pub fn runtime(&self, workers: usize) -> anyhow::Result<NsRuntime> {
        let file = Arc::new(self.file()?);
        let name = self.name.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(format!("ns-{}", self.name))
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) =
                    move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
                {
                    // Nothing may run outside the namespace: better no thread at all.
                    panic!("cannot enter network namespace {name}: {e}");
                }
            })
            .build()
            .context("building a tokio runtime")?;
        Ok(NsRuntime {
            rt: Some(rt),
            ns: self.clone(),
        })
    }
}

/// A tokio runtime whose threads are inside a namespace. Futures given to it run on its
/// worker threads, never on the caller's (whose namespace may be another). Dropping it
/// shuts it down without waiting for its tasks.
#[derive(Debug)]
pub struct NsRuntime {
    rt: Option<tokio::runtime::Runtime>,
    ns: Netns,
}

impl NsRuntime {
    /// The namespace.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        match &self.rt {
            Some(rt) => rt,
            None => unreachable!("the runtime is only taken on drop"),
        }
    }

    /// A handle to the runtime (tasks spawned with it run inside the namespace).
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.rt().handle()
    }

    /// Spawns `fut` on the runtime.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt().spawn(fut)
    }

    /// Runs `fut` on the runtime's workers and waits for it from a thread outside any
    /// runtime (a panic in `fut` is passed on).
    pub fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = self.rt().spawn(fut);
        join(self.rt().block_on(task))
    }

    /// Runs `fut` on the runtime's workers and waits for it from async code of any runtime
    /// (a panic in `fut` is passed on).
    pub async fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        join(self.rt().spawn(fut).await)
    }
}

fn join<T>(r: Result<T, tokio::task::JoinError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("a task of a namespace runtime was cancelled: {e}"),
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
