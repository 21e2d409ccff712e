//! The agent's side of the control socket: one connection, re-opened when it breaks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::protocol::{self, ProtocolError, Request, Response, PROTOCOL};

/// How long one request may take. Rebuilding the device is the slowest request (milliseconds);
/// a datapath that does not answer in this time is treated as gone.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the datapath at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("datapath at {path}: {source}")]
    Protocol {
        path: PathBuf,
        source: ProtocolError,
    },
    #[error("the datapath at {0} did not answer within {CALL_TIMEOUT:?}")]
    Timeout(PathBuf),
    #[error("the datapath speaks control protocol {theirs}, this agent {PROTOCOL}: run matching releases of the agent and the datapath")]
    IncompatibleProtocol { theirs: u32 },
}

/// The agent's side of the control socket: one request, one response. [`DatapathClient`] is the
/// real one; the agent's whole-pass tests answer in memory.
pub trait Datapath: Send {
    fn call(
        &mut self,
        req: &Request,
    ) -> impl std::future::Future<Output = Result<Response, ClientError>> + Send;
}

impl Datapath for DatapathClient {
    fn call(
        &mut self,
        req: &Request,
    ) -> impl std::future::Future<Output = Result<Response, ClientError>> + Send {
        DatapathClient::call(self, req)
    }
}

pub struct DatapathClient {
    socket: PathBuf,
    conn: Option<(BufReader<OwnedReadHalf>, OwnedWriteHalf)>,
}

impl DatapathClient {
    pub fn new(socket: &Path) -> DatapathClient {
        DatapathClient {
            socket: socket.to_path_buf(),
            conn: None,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `req` and returns the response. A broken connection (the datapath restarted) is
    /// re-opened and the request sent once more: every request is idempotent (a whole device or
    /// peer set, or a read), so a request that did reach the old process is safe to repeat.
    pub async fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let line = protocol::encode(req).map_err(|source| self.protocol_error(source))?;
        let mut last = None;
        for _ in 0..2 {
            match self.exchange(&line).await {
                Ok(resp) if resp.info.protocol != PROTOCOL => {
                    return Err(ClientError::IncompatibleProtocol {
                        theirs: resp.info.protocol,
                    })
                }
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    self.conn = None;
                    last = Some(e);
                }
            }
        }
        Err(last.expect("the loop ran at least once"))
    }

    async fn exchange(&mut self, line: &[u8]) -> Result<Response, ClientError> {
        if self.conn.is_none() {
            let stream =
                UnixStream::connect(&self.socket)
                    .await
                    .map_err(|source| ClientError::Connect {
                        path: self.socket.clone(),
                        source,
                    })?;
            let (read, write) = stream.into_split();
            self.conn = Some((BufReader::new(read), write));
        }
        let (reader, writer) = self.conn.as_mut().expect("connected above");
        let io = async {
            writer.write_all(line).await?;
            protocol::read_message::<Response, _>(reader).await
        };
        match tokio::time::timeout(CALL_TIMEOUT, io).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(source)) => Err(self.protocol_error(source)),
            Err(_) => Err(ClientError::Timeout(self.socket.clone())),
        }
    }

    fn protocol_error(&self, source: ProtocolError) -> ClientError {
        ClientError::Protocol {
            path: self.socket.clone(),
            source,
        }
    }
}
