//! Publishing messages: one [`PUBLISH_SCRIPT`] call for a batch, a message to more streams
//! than one call takes split over several [`CHUNK_SCRIPT`] calls.

use super::*;

impl RedisBus {
    /// Publishes one message to more than [`STREAMS_PER_CALL`] streams over several
    /// [`CHUNK_SCRIPT`] calls of at most that many streams each.
    pub(super) async fn publish_split(&self, msg: &Outgoing) -> Result<Published, BusError> {
        let streams = msg.streams();
        let chunks: Vec<&[StreamKey<'_>]> = streams.chunks(STREAMS_PER_CALL).collect();
        let collapse = msg.header.collapse.as_deref().unwrap_or("");
        let id = msg.header.id.as_str();
        'message: loop {
            let mut seq = 0;
            for (i, chunk) in chunks.iter().enumerate() {
                let phase = if i == 0 {
                    "first"
                } else if i + 1 == chunks.len() {
                    "last"
                } else {
                    "more"
                };
                let mut keys = self.publish_keys();
                keys.push(self.seen_key(id));
                self.append_keys(msg, chunk.iter(), &mut keys);
                let body = if i == 0 {
                    Value::Bytes(msg.body().clone())
                } else {
                    Value::Integer(seq as i64)
                };
                let args: Vec<Value> = vec![
                    self.max_messages.as_str().into(),
                    self.window_secs.as_str().into(),
                    self.bus_channel.as_str().into(),
                    self.body_prefix.as_str().into(),
                    id.into(),
                    phase.into(),
                    body,
                    Value::Integer(LEASE_MS as i64),
                    collapse.into(),
                ];
                let items = self.publish_eval(&self.chunk_script, keys, args).await?;
                let (n, flag) = match items.as_slice() {
                    [n] => (int(n)?, 0),
                    [n, flag] => (int(n)?, int(flag)?),
                    _ => return Err(BusError::Reply(format!("publish: {items:?}"))),
                };
                if n == -2 {
                    tracing::warn!(
                        id,
                        "a message written in parts was aborted; publishing it again"
                    );
                    continue 'message;
                }
                if flag == 1 {
                    return Ok(Published {
                        seq: n.max(0) as u64,
                        duplicate: true,
                    });
                }
                seq = n.max(0) as u64;
            }
            self.metrics
                .bus_published
                .with_label_values(&[Channel::Bus.as_str()])
                .inc();
            return Ok(Published {
                seq,
                duplicate: false,
            });
        }
    }

    /// The four keys every publish script starts with.
    pub(super) fn publish_keys(&self) -> Vec<String> {
        vec![
            self.seq_key.clone(),
            self.epoch_key.clone(),
            self.pending_key.clone(),
            self.lease_key.clone(),
        ]
    }

    /// Runs a publish script until it is not told to wait (`{-1}`: another publisher's
    /// message is half written), for at most [`BUSY_WAIT`].
    pub(super) async fn publish_eval(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Vec<Value>, BusError> {
        let deadline = tokio::time::Instant::now() + BUSY_WAIT;
        loop {
            let reply: Result<Value, _> = script
                .evalsha_with_reload(&self.publisher, keys.clone(), args.clone())
                .await;
            let items = match reply {
                Ok(Value::Array(items)) => items,
                Ok(other) => return Err(BusError::Reply(format!("publish: {other:?}"))),
                Err(e) => {
                    self.metrics.bus_publish_errors.inc();
                    return Err(e.into());
                }
            };
            if items.len() != 1 || int(&items[0])? != -1 {
                return Ok(items);
            }
            if tokio::time::Instant::now() >= deadline {
                self.metrics.bus_publish_errors.inc();
                return Err(BusError::Reply(
                    "another publisher's message stayed half written".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// One [`PUBLISH_SCRIPT`] call for `msgs`.
    pub(super) async fn publish_call(&self, msgs: &[Outgoing]) -> Result<Vec<Published>, BusError> {
        let mut keys = self.publish_keys();
        let mut args: Vec<Value> = vec![
            self.max_messages.as_str().into(),
            self.window_secs.as_str().into(),
            self.bus_channel.as_str().into(),
            self.body_prefix.as_str().into(),
        ];
        for msg in msgs {
            let streams = msg.streams();
            keys.push(self.seen_key(&msg.header.id));
            self.append_keys(msg, streams.iter(), &mut keys);
            args.push(Value::Integer(streams.len() as i64));
            args.push(Value::Bytes(msg.body().clone()));
            args.push(msg.header.collapse.as_deref().unwrap_or("").into());
            if self.node_channel.is_some() {
                let to_users = matches!(msg.header.to, Target::User { .. } | Target::Users(_));
                args.push(if to_users { "u" } else { "" }.into());
            }
        }
        let items = self.publish_eval(&self.publish_script, keys, args).await?;
        if items.len() != 2 * msgs.len() {
            return Err(BusError::Reply(format!("publish: {items:?}")));
        }
        let published = items
            .chunks(2)
            .map(|pair| {
                Ok(Published {
                    seq: int(&pair[0])?.max(0) as u64,
                    duplicate: int(&pair[1])? == 1,
                })
            })
            .collect::<Result<Vec<_>, BusError>>()?;
        let fresh = published.iter().filter(|p| !p.duplicate).count();
        self.metrics
            .bus_published
            .with_label_values(&[Channel::Bus.as_str()])
            .inc_by(fresh as u64);
        Ok(published)
    }
}
