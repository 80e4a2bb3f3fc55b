//! The closed sets of label values of the metric families, one enum each.

/// A closed set of label values of one metric family: each value is written once, here, and
/// call sites name the variant. [`Metrics::new`] registers the values it starts at zero
/// from these lists.
macro_rules! labels {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $value:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value.
            pub const fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $value),+
                }
            }
        }
    };
}

labels! {
    /// `reason` of `fanout_dropped_total`.
    Dropped {
        QueueFull => "queue_full",
        Expired => "expired",
        Duplicate => "duplicate",
        Closed => "closed",
        BufferFull => "buffer_full",
    }
}

labels! {
    /// `reason` of `fanout_bus_gaps_total`.
    Gap {
        Reconnected => "reconnected",
        Lagged => "lagged",
        Skipped => "skipped",
        Reset => "reset",
    }
}

labels! {
    /// `kind` of `fanout_kafka_consumer_errors_total`.
    ConsumerError {
        Undecodable => "undecodable",
        Broker => "broker",
        Other => "other",
    }
}

labels! {
    /// `result` of `fanout_resumes_total`.
    Resume {
        Recovered => "recovered",
        NotRecovered => "not_recovered",
        Error => "error",
    }
}

labels! {
    /// `result` of `fanout_gap_recoveries_total`.
    GapRecovery {
        Recovered => "recovered",
        Lost => "lost",
    }
}

labels! {
    /// `listener` of `fanout_http_pending_connections` and
    /// `fanout_http_connections_evicted_total`.
    Listener {
        Public => "public",
        Admin => "admin",
    }
}

labels! {
    /// `outcome` of `fanout_receipts_total` (and of the receipt records themselves).
    Receipt {
        Delivered => "delivered",
        Offline => "offline",
        Filtered => "filtered",
        Expired => "expired",
        Acked => "acked",
    }
}

labels! {
    /// `reason` of `fanout_receipts_dropped_total`.
    ReceiptDropped {
        /// The receipts task's channel was full: the router, ingest or a session went on.
        ChannelFull => "channel_full",
        /// librdkafka's queue of the receipts producer was full.
        QueueFull => "queue_full",
        /// The brokers did not take a queued record (`message.timeout.ms` passed).
        ProduceFailed => "produce_failed",
        /// Redis did not answer the claim of a negative outcome: not reported, rather than
        /// maybe reported twice.
        ClaimFailed => "claim_failed",
        /// Presence did not answer whether a user was online: no `offline` record.
        PresenceFailed => "presence_failed",
        /// An acknowledged id longer than any message id: ignored.
        BadAck => "bad_ack",
    }
}

labels! {
    /// `result` of `fanout_asks_total`.
    Ask {
        Ok => "ok",
        Error => "error",
        Disabled => "disabled",
    }
}

labels! {
    /// `revoke` of `fanout_kicks_total`: was the disconnect request a revocation.
    KickKind {
        Kick => "false",
        Revoke => "true",
    }
}

labels! {
    /// `code` of `fanout_kicked_connections_total`: the close code a kick asked for.
    KickClose {
        Kicked => "4004",
        Revoked => "4003",
    }
}

labels! {
    /// `result` of `fanout_revocation_reloads_total`.
    Reload {
        Ok => "ok",
        Error => "error",
    }
}

labels! {
    /// `result` of `fanout_presence_events_total`.
    PresenceEvent {
        /// Handed to the producer's queue.
        Produced => "produced",
        /// The producer's queue was full (or refused it): not sent.
        Dropped => "dropped",
        /// Queued, but the brokers never took it (within `message.timeout.ms`).
        Failed => "failed",
    }
}
