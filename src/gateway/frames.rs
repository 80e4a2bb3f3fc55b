//! What a session's client frames ask of the gateway: `ask` (to the upstream topic) and
//! `prefs` (the user's preferences), through [`FrameHandler`].

use super::*;

impl Gateway {
    fn ask(
        &self,
        conn: &Arc<ConnHandle>,
        reference: Option<String>,
        data: &serde_json::value::RawValue,
    ) -> Option<Utf8Bytes> {
        let topic = &self.settings.kafka.upstream_topic;
        let Some(producer) = self.upstream.clone().filter(|_| !topic.is_empty()) else {
            self.metrics
                .asks
                .with_label_values(&[Ask::Disabled.label()])
                .inc();
            return Some(protocol::error_frame(
                &self.metrics.client_errors,
                "ask_disabled",
                "this server has no kafka.upstream_topic",
                reference.as_deref(),
            ));
        };
        let (topic, payload, conn, metrics) = (
            topic.clone(),
            data.get().to_owned(),
            conn.clone(),
            self.metrics.clone(),
        );
        tokio::spawn(async move {
            let platform = conn.platform.map(Platform::as_str).unwrap_or("");
            let headers = [
                ("fanout-user", &*conn.user),
                ("fanout-conn", &*conn.id),
                ("fanout-platform", platform),
            ];
            let reply = match producer
                .send(&topic, Some(&conn.user), payload.as_bytes(), &headers)
                .await
            {
                Ok(()) => {
                    metrics.asks.with_label_values(&[Ask::Ok.label()]).inc();
                    protocol::ask_ok(reference.as_deref())
                }
                Err(e) => {
                    tracing::warn!(conn = %conn.id, error = %e, "ask could not be produced");
                    metrics.asks.with_label_values(&[Ask::Error.label()]).inc();
                    protocol::error_frame(
                        &metrics.client_errors,
                        "ask_failed",
                        "the message could not be delivered upstream; retry",
                        reference.as_deref(),
                    )
                }
            };
            let _ = conn.push(reply);
        });
        None
    }
}

impl Gateway {
    /// Validates at once (an unknown type changes nothing); the write runs on its own task.
    /// Success is answered by the `prefs` frame every connection of the user receives.
    fn set_prefs(
        &self,
        conn: &Arc<ConnHandle>,
        choices: BTreeMap<String, bool>,
        reference: Option<String>,
    ) -> Option<Utf8Bytes> {
        if let Some(unknown) = self.prefs.types.first_unknown(choices.keys()) {
            return Some(protocol::error_frame(
                &self.metrics.client_errors,
                "unknown_type",
                &format!("unknown message type `{unknown}`"),
                reference.as_deref(),
            ));
        }
        let (prefs, conn, metrics) = (self.prefs.clone(), conn.clone(), self.metrics.clone());
        tokio::spawn(async move {
            if let Err(e) = prefs.set(&conn.user, &choices).await {
                tracing::warn!(user = %conn.user, error = %e, "prefs.set failed");
                let reply = protocol::error_frame(
                    &metrics.client_errors,
                    e.code(),
                    &e.to_string(),
                    reference.as_deref(),
                );
                let _ = conn.push(reply);
            }
        });
        None
    }
}

impl FrameHandler for Gateway {
    fn handle(&self, conn: &Arc<ConnHandle>, frame: ClientFrame<'_>) -> Option<Utf8Bytes> {
        match frame {
            ClientFrame::Ping => Some(protocol::pong()),
            ClientFrame::Ack { ids } => {
                self.metrics.acked.inc_by(ids.len() as u64);
                self.receipts.acked(&conn.user, &conn.id, ids);
                None
            }
            ClientFrame::PrefsGet => {
                Some(protocol::prefs(&self.prefs.types.to_map(conn.prefs.get())))
            }
            ClientFrame::PrefsSet { prefs, reference } => self.set_prefs(conn, prefs, reference),
            ClientFrame::Ask { reference, data } => self.ask(conn, reference, data),
        }
    }
}
