//! A background thread running one async task on a runtime of its own,
//! told to stop and joined when its owner lets go of it.

use std::{future::Future, io, thread};

use tokio::sync::oneshot;

pub struct Worker {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Worker {
    /// Starts thread `name` running `task` on `runtime`; `task` is given
    /// the signal it must end on.
    pub fn spawn<F, Fut>(name: &str, runtime: tokio::runtime::Runtime, task: F) -> io::Result<Self>
    where
        F: FnOnce(oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (stop, stopped) = oneshot::channel();
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || runtime.block_on(task(stopped)))?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
