//! The bytes of a tunnel, both ways, with half-close: when one side ends
//! its writes, the other side's writes are shut down, and the relay lasts
//! until both directions have ended.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    registry::{closed_error, CloseSignal},
    RELAY_BUFFER,
};

/// Relays `a` and `b` until both sides finish, returning (bytes a→b,
/// bytes b→a); ends early, with an error, when `close` fires (the registry
/// closed the tunnel).
pub async fn relay<A, B>(a: &mut A, b: &mut B, close: &CloseSignal) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::select! {
        copied = tokio::io::copy_bidirectional_with_sizes(a, b, RELAY_BUFFER, RELAY_BUFFER) => copied,
        () = close.closed() => Err(closed_error()),
    }
}
