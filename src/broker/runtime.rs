//! The local broker runs on a thread of its own, on a single-threaded tokio runtime.
//!
//! # Why: packets of different clients are served in the order they arrived
//! A client may subscribe and another publish at once, without waiting for the SUBACK (the
//! Eclipse Paho suites' `test_request_response` and `test_subscribe_options` do): the
//! SUBSCRIBE reached the broker first and must be in effect for the PUBLISH. The kernel
//! reports ready sockets in the order their data arrived, and the reactor wakes the two
//! connections' tasks in that order; but a multi-threaded scheduler runs the task woken last
//! first (its LIFO slot) or both at once on two workers, so the PUBLISH was routed before the
//! SUBSCRIBE in 19 of 50 tries with the two packets sent back to back (0 with 100 µs between
//! them). A single-threaded runtime runs woken tasks in the order they were woken, as
//! Mosquitto's event loop serves ready sockets: 0 of 300 (test:
//! `broker_pubsub.rs::subscribe_that_arrived_first_is_in_effect_for_another_clients_publish`).
//! Do not add a `yield_now` to that path: its deferred wake-ups run in reverse order. The work per packet is small; the
//! slow parts run elsewhere (password hashing on the blocking pool, the store on its own
//! thread, the uplink on the daemon's runtime).

use std::future::Future;

use tokio::sync::oneshot;

use super::BrokerError;

/// Runs the future `make` returns to completion on a new thread named `local-broker` with a
/// single-threaded runtime, and returns its result. Everything the future spawns runs there
/// too, and ends with it.
pub(super) async fn on_own_thread<F, Fut>(make: F) -> Result<(), BrokerError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), BrokerError>>,
{
    let (done, result) = oneshot::channel();
    std::thread::Builder::new()
        .name("local-broker".into())
        .spawn(move || {
            let outcome = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(make()),
                Err(e) => Err(BrokerError::Runtime(e)),
            };
            let _ = done.send(outcome);
        })
        .map_err(BrokerError::Runtime)?;
    result.await.unwrap_or(Err(BrokerError::Stopped))
}
