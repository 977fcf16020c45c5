//! MQTT over WebSocket (for web-based cab apps): the HTTP upgrade, then binary WebSocket
//! messages carried as the same byte stream the TCP listener serves.
//!
//! The upgrade runs in the connection's own task within `connect_timeout` (the listener
//! never waits on it). The subprotocol `mqtt` is answered when the client offers it; text
//! messages are not MQTT and close the connection (MQTT 5 §6.0).

use std::io;

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use crate::ws_stream::WsIo;

/// Performs the WebSocket upgrade; messages larger than `max_message` are refused.
// The callback's signature (a large error response) is tungstenite's.
#[allow(clippy::result_large_err)]
pub async fn accept(stream: TcpStream, max_message: usize) -> io::Result<WsIo> {
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(max_message);
    config.max_frame_size = Some(max_message);
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let offers_mqtt = req
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim().eq_ignore_ascii_case("mqtt"));
        if offers_mqtt {
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        }
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
        .map_err(io::Error::other)?;
    Ok(WsIo::new(ws))
}
