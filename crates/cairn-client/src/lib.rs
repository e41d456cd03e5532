//! A client for cairnd's socket API (see `cairn-api` for the routes).
//!
//! One HTTP/1.1 connection per call: over a Unix socket a connection costs a few microseconds,
//! and it keeps calls independent (a streamed download and a query never share a connection).
//! Streamed bodies are exposed as `AsyncRead`, so callers copy them with bounded buffers.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cairn_api::{
    routes, AddQuery, ErrorBody, ErrorKind, ExportRequest, Op, PathInfo, PathQuery, Response, VersionInfo,
};
use futures_util::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{header, Method, StatusCode};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::io::AsyncRead;
use tokio::net::UnixStream;
use tokio_util::io::{ReaderStream, StreamReader};

/// A request or response body.
pub type Body = BoxBody<Bytes, io::Error>;

/// Why a call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to cairnd at '{}': {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to cairnd: {0}")]
    Http(#[from] hyper::Error),
    /// The daemon answered with an error; its message is meant for the user as is.
    #[error("{}", body.message)]
    Api { status: u16, body: ErrorBody },
    #[error("cairnd sent an answer this client does not understand: {0}")]
    Decode(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl ClientError {
    /// Whether the failure means that no daemon is listening (so one could be started).
    pub fn is_no_daemon(&self) -> bool {
        matches!(self, ClientError::Connect { source, .. }
            if matches!(source.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused))
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A body with fixed contents.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A body streamed from an `AsyncRead`.
pub fn body_from_reader(r: impl AsyncRead + Send + Sync + 'static) -> Body {
    let stream = ReaderStream::with_capacity(r, 256 * 1024).map_ok(Frame::data);
    BodyExt::boxed(StreamBody::new(stream))
}

/// A response body as an `AsyncRead`.
pub fn reader_of(body: Incoming) -> impl AsyncRead + Send + Unpin {
    StreamReader::new(body.into_data_stream().map_err(io::Error::other))
}

/// A handle on the daemon's socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

fn query_string(q: &impl serde::Serialize) -> Result<String> {
    serde_urlencoded::to_string(q).map_err(|e| ClientError::Decode(e.to_string()))
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client { socket: socket.to_owned() }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(&self, method: Method, uri: &str, body: Body) -> Result<hyper::Response<Incoming>> {
        self.call_typed(method, uri, "application/octet-stream", body).await
    }

    async fn call_json(&self, uri: &str, value: &impl serde::Serialize) -> Result<hyper::Response<Incoming>> {
        let body = serde_json::to_vec(value).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.call_typed(Method::POST, uri, "application/json", full(body)).await
    }

    async fn call_typed(
        &self,
        method: Method,
        uri: &str,
        content_type: &str,
        body: Body,
    ) -> Result<hyper::Response<Incoming>> {
        self.call_handing_over(method, uri, content_type, body, &[]).await
    }

    /// [`Client::call_typed`] on a connection that first hands `files` to the daemon.
    async fn call_handing_over(
        &self,
        method: Method,
        uri: &str,
        content_type: &str,
        body: Body,
        files: &[&std::fs::File],
    ) -> Result<hyper::Response<Incoming>> {
        let connect = async {
            let at = cairn_api::socket::SocketAddress::of(&self.socket)?;
            UnixStream::connect(at.path()).await
        };
        let stream = connect.await.map_err(|source| ClientError::Connect { socket: self.socket.clone(), source })?;
        if !files.is_empty() {
            use std::os::fd::AsRawFd;
            let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
            let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
            let mark = [cairn_api::HANDOVER_MARK];
            stream.writable().await.map_err(|source| ClientError::Connect { socket: self.socket.clone(), source })?;
            // One byte on a new connection: its send buffer is empty, so this cannot block.
            nix::sys::socket::sendmsg::<()>(
                stream.as_raw_fd(),
                &[io::IoSlice::new(&mark)],
                &cmsg,
                nix::sys::socket::MsgFlags::empty(),
                None,
            )
            .map_err(|e| ClientError::Connect { socket: self.socket.clone(), source: e.into() })?;
        }
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "cairnd")
            .header(header::CONTENT_TYPE, content_type)
            .body(body)
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let resp = sender.send_request(req).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
            kind: if status == StatusCode::NOT_FOUND { ErrorKind::NotFound } else { ErrorKind::Internal },
            message: format!("cairnd answered {status}: {}", String::from_utf8_lossy(&bytes).trim()),
        });
        Err(ClientError::Api { status: status.as_u16(), body })
    }

    async fn json<T: serde::de::DeserializeOwned>(resp: hyper::Response<Incoming>) -> Result<T> {
        let bytes = resp.into_body().collect().await?.to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// The daemon's version, store directory and whether we are trusted.
    pub async fn version(&self) -> Result<VersionInfo> {
        Client::json(self.send(Method::GET, routes::VERSION, full(Bytes::new())).await?).await
    }

    /// Which daemon this is: pid, socket, store, root, config file, start and version.
    pub async fn daemon_status(&self) -> Result<cairn_api::DaemonStatus> {
        Client::json(self.send(Method::GET, routes::DAEMON_STATUS, full(Bytes::new())).await?).await
    }

    /// The daemon's effective settings.
    pub async fn daemon_config(&self) -> Result<cairn_api::config::Settings> {
        Client::json(self.send(Method::GET, routes::DAEMON_CONFIG, full(Bytes::new())).await?).await
    }

    /// The daemon's p2p node and its peers.
    pub async fn peers(&self) -> Result<cairn_api::PeersStatus> {
        Client::json(self.send(Method::GET, routes::PEERS, full(Bytes::new())).await?).await
    }

    /// Asks the peer `req.to` to take paths from the daemon's store (it checks them as any
    /// substitution); answers when the peer is done.
    pub async fn peers_push(&self, req: &cairn_api::PeerPushRequest) -> Result<cairn_api::PeerPushAnswer> {
        Client::json(self.call_json(routes::PEERS_PUSH, req).await?).await
    }

    /// Asks the daemon to shut down (it answers first, then stops listening and finishes what
    /// runs); needs a trusted user.
    pub async fn daemon_stop(&self) -> Result<cairn_api::DaemonStatus> {
        Client::json(self.send(Method::POST, routes::DAEMON_STOP, full(Bytes::new())).await?).await
    }

    /// One operation's answer as raw JSON bytes (`{"kind":…,"value":…}`), for callers that parse
    /// large answers without owning every string (a 100k-path closure).
    pub async fn call_bytes<O: Op>(&self, op: O) -> Result<Bytes> {
        Ok(self.call_json(routes::QUERY, &op.into_request()).await?.into_body().collect().await?.to_bytes())
    }

    /// One small operation of `POST /v1/query`, answered with its own type.
    pub async fn call<O: Op>(&self, op: O) -> Result<O::Answer> {
        let resp: Response = Client::json(self.call_json(routes::QUERY, &op.into_request()).await?).await?;
        O::answer(resp).map_err(|other| {
            ClientError::Decode(format!("an answer of kind '{}' to {}", other.kind(), std::any::type_name::<O>()))
        })
    }

    /// Adds a path from a streamed body (a NAR or a flat file, as `q` says).
    pub async fn add(&self, q: &AddQuery, body: Body) -> Result<PathInfo> {
        let uri = format!("{}?{}", routes::ADD, query_string(q)?);
        Client::json(self.send(Method::POST, &uri, body).await?).await
    }

    /// Adds the regular file `file` is open on, handing the open file to the daemon instead of
    /// streaming its bytes (`q.handed_over` is set here).
    pub async fn add_file(&self, q: &AddQuery, file: &std::fs::File) -> Result<PathInfo> {
        let q = AddQuery { handed_over: true, ..q.clone() };
        let uri = format!("{}?{}", routes::ADD, query_string(&q)?);
        let resp =
            self.call_handing_over(Method::POST, &uri, "application/octet-stream", full(Bytes::new()), &[file]).await?;
        Client::json(resp).await
    }

    /// Adds a tree from a spliced NAR body (`cairn_nar_fs::Spliced`) whose large files are
    /// `files`, handed to the daemon open (`q.spliced` is set here).
    pub async fn add_spliced(&self, q: &AddQuery, body: Body, files: &[&std::fs::File]) -> Result<PathInfo> {
        let q = AddQuery { spliced: true, handed_over: false, ..q.clone() };
        let uri = format!("{}?{}", routes::ADD, query_string(&q)?);
        Client::json(self.call_handing_over(Method::POST, &uri, "application/octet-stream", body, files).await?).await
    }

    /// The NAR of a valid path.
    pub async fn nar(&self, path: &str) -> Result<impl AsyncRead + Send + Unpin> {
        let uri = format!("{}?{}", routes::NAR, query_string(&PathQuery { path: path.to_owned() })?);
        Ok(reader_of(self.send(Method::GET, &uri, full(Bytes::new())).await?.into_body()))
    }

    /// A regular file inside a store path.
    pub async fn cat(&self, path: &str) -> Result<impl AsyncRead + Send + Unpin> {
        let uri = format!("{}?{}", routes::CAT, query_string(&PathQuery { path: path.to_owned() })?);
        Ok(reader_of(self.send(Method::GET, &uri, full(Bytes::new())).await?.into_body()))
    }

    /// A blob of an image (a streamed layer is made as it is sent; a broken one ends the
    /// stream with an error).
    pub async fn oci_blob(&self, image: &str, digest: &str) -> Result<impl AsyncRead + Send + Unpin> {
        let q = cairn_api::BlobQuery { image: image.to_owned(), digest: digest.to_owned() };
        let uri = format!("{}?{}", routes::OCI_BLOB, query_string(&q)?);
        Ok(reader_of(self.send(Method::GET, &uri, full(Bytes::new())).await?.into_body()))
    }

    /// An export stream of `paths`.
    pub async fn export(&self, paths: Vec<String>) -> Result<impl AsyncRead + Send + Unpin> {
        Ok(reader_of(self.call_json(routes::EXPORT, &ExportRequest { paths }).await?.into_body()))
    }

    /// Starts a substitution; its answer is a stream of JSON lines (`SubstituteEvent`).
    pub async fn substitute(&self, req: &cairn_api::SubstituteRequest) -> Result<impl AsyncRead + Send + Unpin> {
        Ok(reader_of(self.call_json(routes::SUBSTITUTE, req).await?.into_body()))
    }

    /// Starts a realisation; its answer is a stream of JSON lines (`RealiseEvent`).
    pub async fn realise(&self, req: &cairn_api::RealiseRequest) -> Result<impl AsyncRead + Send + Unpin> {
        Ok(reader_of(self.call_json(routes::REALISE, req).await?.into_body()))
    }

    /// The log of a past build (of a derivation, or of the deriver of an output).
    pub async fn log(&self, path: &str) -> Result<impl AsyncRead + Send + Unpin> {
        let uri = format!("{}?{}", routes::LOG, query_string(&PathQuery { path: path.to_owned() })?);
        Ok(reader_of(self.send(Method::GET, &uri, full(Bytes::new())).await?.into_body()))
    }

    /// Sends a push stream (narinfos and NARs); returns the paths added.
    pub async fn receive(&self, body: Body, check_sigs: bool) -> Result<Vec<String>> {
        let uri = format!("{}?{}", routes::RECEIVE, query_string(&cairn_api::ReceiveQuery { check_sigs })?);
        Client::json(self.send(Method::POST, &uri, body).await?).await
    }

    /// Imports an export stream.
    pub async fn import(&self, body: Body) -> Result<Vec<PathInfo>> {
        Client::json(self.send(Method::POST, routes::IMPORT, body).await?).await
    }

    /// Sends an import stream (blobs, then a commit).
    pub async fn import_image(&self, body: Body) -> Result<cairn_api::image::ImageInfo> {
        Client::json(self.send(Method::POST, routes::OCI_IMPORT, body).await?).await
    }

    /// Starts a pull; its answer is a stream of JSON lines (`ImageEvent`).
    pub async fn pull(&self, req: &cairn_api::image::PullRequest) -> Result<impl AsyncRead + Send + Unpin> {
        Ok(reader_of(self.call_json(routes::OCI_PULL, req).await?.into_body()))
    }

    /// Starts an image build; its answer is a stream of JSON lines (`image::BuildEvent`).
    pub async fn image_build(&self, req: &cairn_api::image::BuildRequest) -> Result<impl AsyncRead + Send + Unpin> {
        Ok(reader_of(self.call_json(routes::OCI_BUILD, req).await?.into_body()))
    }

    /// Starts a push; its answer is a stream of JSON lines (`ImageEvent`).
    pub async fn push(&self, req: &cairn_api::image::PushRequest) -> Result<impl AsyncRead + Send + Unpin> {
        Ok(reader_of(self.call_json(routes::OCI_PUSH, req).await?.into_body()))
    }
}
