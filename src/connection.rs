//! The proxy listener's connection loop. Decides two things Pingora 0.9.1 has no hook for:
//!
//! - **Header deadline.** A request header must arrive whole within `server.header_timeout_ms`
//!   or the connection is closed. Pingora times each `read()` of the header separately (60 s,
//!   its keep-alive or read timeout), so a client sending one byte every few seconds is never
//!   closed, and neither `HttpServerOptions` nor `ProxyHttp` sees a header before it is
//!   complete. So [`HeadGuard`] runs the HTTP/1 loop of Pingora's `ServerApp` for the proxy
//!   itself (the same `process_new_http` calls, keep-alive and reuse counts as Pingora sets
//!   them) over a [`DeadlineStream`]: in the header phase each read of the stream races one
//!   deadline, and the phase ends at the header's blank line. The first request's deadline runs
//!   from accept; a keep-alive follow-up's from its first byte (the idle wait before it stays
//!   Pingora's keep-alive timeout). Past the deadline the read fails and Pingora closes the
//!   connection without an answer; nothing was admitted, so nothing is charged.
//! - **Work in progress for a graceful stop.** Every connection inside a request is counted in
//!   [`InFlight`]; [`DrainWatch`] (a background service) lets the process exit as soon as that
//!   count reaches zero after SIGTERM, and at the latest when `server.shutdown_grace_s` ends.
//!   Pingora itself sleeps the whole grace and then drops the runtimes.
//!
//! Responses written after SIGTERM carry `Connection: close` ([`close_if_stopping`]), so
//! keep-alive clients open a new connection (refused: nothing was sent) instead of having a
//! follow-up request cut on a connection that closes.
//!
//! Only HTTP/1 over plain TCP reaches the proxy listener (no h2c, no TLS), which is all this
//! loop handles. Called by `server::build_server`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Pingora's keep-alive timeout for downstream connections (what its own loop sets), seconds.
const KEEPALIVE_S: u64 = 60;

/// How many proxy connections are inside a request right now.
#[derive(Debug, Default, Clone)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.0.clone())
    }
}

struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The proxy app behind the header deadline and the in-flight count.
pub struct HeadGuard<A> {
    pub app: Arc<A>,
    pub header_timeout: Duration,
    pub in_flight: InFlight,
}

#[async_trait]
impl<A> ServerApp for HeadGuard<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stream: Stream = Box::new(DeadlineStream::new(stream, self.header_timeout, true));
        let mut session = ServerSession::new_http1(stream);
        // As Pingora's own loop: no reuse once the server is stopping.
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(KEEPALIVE_S));
        }
        session.set_keepalive_reuses_remaining(
            self.app
                .server_options()
                .and_then(|o| o.keepalive_request_limit),
        );
        let mut result = {
            let _busy = self.in_flight.enter();
            self.app.process_new_http(session, shutdown).await
        };
        while let Some((stream, settings)) = result.map(|r| r.consume()) {
            let stream = match stream.into_any().downcast::<DeadlineStream>() {
                Ok(mut s) => {
                    s.next_request();
                    s as Stream
                }
                // Not ours (cannot happen): close rather than serve it without the deadline.
                Err(_) => return None,
            };
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            let _busy = self.in_flight.enter();
            result = self.app.process_new_http(session, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        // Wakes keep-alive connections parked between requests so they close now.
        self.app.http_cleanup().await;
    }
}

/// Where the stream is in the current request.
enum Phase {
    /// Reading a request header: `deadline` once it runs; `newline` after a line end; `content`
    /// once a byte other than CR/LF arrived (blank lines before a request line do not end it).
    Header {
        deadline: Option<Pin<Box<Sleep>>>,
        newline: bool,
        content: bool,
    },
    /// The header is complete: reads pass through untimed.
    Message,
}

/// A downstream stream that fails its reads once a request header is late (see the module doc).
pub struct DeadlineStream {
    inner: Stream,
    timeout: Duration,
    phase: Phase,
}

impl std::fmt::Debug for DeadlineStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineStream")
            .field("inner", &self.inner)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl DeadlineStream {
    /// `from_now`: the deadline runs from now (a new connection) rather than the first byte.
    pub fn new(inner: Stream, timeout: Duration, from_now: bool) -> Self {
        let mut s = Self {
            inner,
            timeout,
            phase: Phase::Message,
        };
        s.start_header(from_now);
        s
    }

    fn start_header(&mut self, from_now: bool) {
        let timeout = self.timeout;
        self.phase = Phase::Header {
            deadline: from_now.then(|| deadline_in(timeout)),
            newline: false,
            content: false,
        };
    }

    /// The previous request is done; the next header's deadline starts at its first byte.
    pub fn next_request(&mut self) {
        self.start_header(false);
    }

    /// Looks at bytes just read in the header phase: starts the deadline, ends the phase at the
    /// blank line (CRLF CRLF or LF LF, as Pingora's parser accepts both).
    fn saw(&mut self, bytes: &[u8]) {
        let timeout = self.timeout;
        let Phase::Header {
            deadline,
            newline,
            content,
        } = &mut self.phase
        else {
            return;
        };
        if bytes.is_empty() {
            return;
        }
        if deadline.is_none() {
            *deadline = Some(deadline_in(timeout));
        }
        for &b in bytes {
            match b {
                b'\n' if *newline && *content => {
                    self.phase = Phase::Message;
                    return;
                }
                b'\n' => *newline = true,
                b'\r' => {}
                _ => {
                    *newline = false;
                    *content = true;
                }
            }
        }
    }
}

fn deadline_in(timeout: Duration) -> Pin<Box<Sleep>> {
    Box::pin(tokio::time::sleep_until((Instant::now() + timeout).into()))
}

impl AsyncRead for DeadlineStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Phase::Header {
            deadline: Some(d), ..
        } = &mut self.phase
        {
            if d.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the request header did not arrive within server.header_timeout_ms",
                )));
            }
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if matches!(self.phase, Phase::Header { .. }) {
                self.saw(&buf.filled()[before..]);
                // A deadline that has just started must wake this task even if the next read
                // stays pending: poll it once now.
                if let Phase::Header {
                    deadline: Some(d), ..
                } = &mut self.phase
                {
                    let _ = d.as_mut().poll(cx);
                }
            }
        }
        polled
    }
}

impl AsyncWrite for DeadlineStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for DeadlineStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for DeadlineStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for DeadlineStream {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for DeadlineStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for DeadlineStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for DeadlineStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for DeadlineStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// A response written while the server stops says `Connection: close`: a keep-alive client
/// would otherwise send its next request on a connection that is about to close unanswered.
/// (Pingora only stops reuse for requests that *start* after SIGTERM.) Called by the proxy
/// before each response header.
pub fn close_if_stopping(session: &mut pingora::proxy::Session) {
    if session.is_process_shutting_down() {
        session.set_keepalive(None);
    }
}

/// Ends the process once a SIGTERM'd server has no request in flight, or when the grace ends.
pub struct DrainWatch {
    pub in_flight: InFlight,
    pub grace: Duration,
    /// Time left after the last request for the store writes it spawned (a spend settlement's
    /// mark runs detached, bounded by `store.command_timeout_ms`).
    pub settle_margin: Duration,
}

#[async_trait]
impl BackgroundService for DrainWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.wait_for(|stopping| *stopping).await.is_err() {
            return;
        }
        let started = Instant::now();
        let deadline = started + self.grace;
        loop {
            let left = self.in_flight.get();
            if left == 0 {
                let settled = (started.elapsed() + self.settle_margin).min(self.grace);
                tokio::time::sleep_until((started + settled).into()).await;
                tracing::info!(
                    after_ms = started.elapsed().as_millis() as u64,
                    "graceful stop: every admitted request finished; exiting"
                );
                std::process::exit(0);
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    in_flight = left,
                    "graceful stop: server.shutdown_grace_s ended with requests in flight; exiting"
                );
                std::process::exit(0);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair(from_now: bool) -> (DeadlineStream, tokio::io::DuplexStream) {
        let (server, client) = tokio::io::duplex(4096);
        let s = DeadlineStream::new(Box::new(server), Duration::from_millis(500), from_now);
        (s, client)
    }

    async fn read(s: &mut DeadlineStream) -> std::io::Result<Vec<u8>> {
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await?;
        Ok(buf[..n].to_vec())
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_that_is_not_whole_in_time_fails_the_read() {
        let (mut s, mut c) = pair(true);
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
        assert_eq!(read(&mut s).await.unwrap().len(), 25);
        // The rest trickles in, too late: the read waiting for it fails at the deadline.
        let e = read(&mut s).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_that_sends_nothing_fails_at_the_deadline() {
        let (mut s, _c) = pair(true);
        let started = tokio::time::Instant::now();
        let e = read(&mut s).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!((500..=510).contains(&waited.as_millis()), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn once_the_header_is_whole_reads_are_untimed_until_the_next_request() {
        let (mut s, mut c) = pair(true);
        // Split across reads, ending with a bare-LF blank line; leading blank lines do not count.
        c.write_all(b"\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\n")
            .await
            .unwrap();
        read(&mut s).await.unwrap();
        c.write_all(b"\n").await.unwrap();
        read(&mut s).await.unwrap();
        assert!(matches!(s.phase, Phase::Message));
        // A slow body is not the header's business.
        tokio::time::sleep(Duration::from_secs(5)).await;
        c.write_all(b"abc").await.unwrap();
        assert_eq!(read(&mut s).await.unwrap(), b"abc");
        // A keep-alive follow-up: idle time before its first byte is not counted...
        s.next_request();
        let reader = tokio::spawn(async move {
            let first = read(&mut s).await.map(|b| b.len());
            let second = read(&mut s).await.map(|b| b.len());
            (first, second)
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        c.write_all(b"G").await.unwrap();
        // ...but from its first byte it has the same 500 ms.
        let (first, second) = reader.await.unwrap();
        assert_eq!(first.unwrap(), 1);
        assert_eq!(second.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    }
}
