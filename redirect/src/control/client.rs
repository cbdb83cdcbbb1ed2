//! The CLI's side of the control socket.

use std::path::Path;

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

use super::protocol::{Ask, Reply, Request, State, StateRequest};

/// A successful answer in a shape this CLI does not read: the controller is another version.
#[derive(Debug, thiserror::Error)]
#[error(
    "the controller reports success, in a form this redirect does not read ({why}; is it another version?); what it answered: {answer}"
)]
pub struct Unreadable {
    pub why: serde_json::Error,
    pub answer: serde_json::Value,
}

/// Sends `request` to the controller at `path`, passing progress lines to `on_progress`, and
/// decodes its answer. `Ok(None)` means no controller is listening there.
pub async fn ask<Q: Ask>(
    path: &Path,
    request: Q,
    mut on_progress: impl FnMut(&str),
) -> anyhow::Result<Option<Q::Answer>> {
    let Ok(stream) = UnixStream::connect(path).await else {
        return Ok(None);
    };
    let (r, mut w) = stream.into_split();
    let request: Request = request.into();
    let mut line = serde_json::to_string(&request)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(l) = lines.next_line().await? {
        // The envelope first, the answer second: an answer of another version's shape is
        // still a success the operator must hear about, with what it said.
        let reply: Reply<serde_json::Value> = serde_json::from_str(&l).map_err(|e| {
            anyhow::anyhow!(
                "the controller's answer did not parse ({e}): is it another version of redirect?"
            )
        })?;
        match reply {
            Reply::Progress(p) => on_progress(&p),
            Reply::Ok(answer) => {
                return match serde_json::from_value(answer.clone()) {
                    Ok(answer) => Ok(Some(answer)),
                    Err(why) => Err(Unreadable { why, answer }.into()),
                };
            }
            Reply::Error(e) => anyhow::bail!("{e}"),
        }
    }
    anyhow::bail!("the controller closed the connection without an answer")
}

/// Asks the controller at `socket` for its [`State`]; `None` when none answers (or it answers
/// something that is not one).
pub async fn state(socket: &Path) -> Option<State> {
    ask(socket, StateRequest, |_| {}).await.ok().flatten()
}
