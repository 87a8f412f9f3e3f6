//! `kafka`: produces each rendered message as a JSON record to a topic, keyed by the step's
//! rendered `key`. The producer is idempotent with `acks=all`, so producer retries never write a
//! record twice; a record Kafka refuses for good (too large, not authorised, unknown topic) is a
//! permanent failure, anything else is retried by the delivery stage.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{BoxFut, DeliveryError, Destination};
use crate::config::KafkaConn;
use crate::outbox::{Job, NewJob};
use crate::routing::Router;

/// The `kafka` destination: produces each message as JSON with the rendered key.
pub struct KafkaDest {
    producer: Result<FutureProducer, String>,
    topic: String,
    timeout: Duration,
}

impl KafkaDest {
    /// A producer with idempotence (no duplicates from producer retries) and `acks=all`.
    pub fn new(conn: &KafkaConn, topic: &str, timeout: Duration) -> Self {
        let producer = conn
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .create::<FutureProducer>()
            .map_err(|e| e.to_string());
        KafkaDest {
            producer,
            topic: topic.to_string(),
            timeout,
        }
    }
}

impl Destination for KafkaDest {
    fn deliver<'a>(
        &'a self,
        job: &'a Job,
        _rules: &'a Router,
    ) -> BoxFut<'a, Result<Vec<NewJob>, DeliveryError>> {
        Box::pin(async move {
            let producer = self.producer.as_ref().map_err(|e| {
                DeliveryError::Permanent(format!("cannot create the Kafka producer: {e}"))
            })?;
            super::message_of(job)?;
            // The stored text is the message's compact JSON, what `to_string` would write.
            let payload = job.body();
            let mut record = FutureRecord::to(&self.topic).payload(&payload[..]);
            if let Some(k) = &job.target.key {
                record = record.key(k);
            }
            match producer.send(record, self.timeout).await {
                Ok(_) => Ok(Vec::new()),
                Err((e, _)) => {
                    use rdkafka::types::RDKafkaErrorCode as C;
                    let reason = format!("produce to {}: {e}", self.topic);
                    match e.rdkafka_error_code() {
                        Some(
                            C::MessageSizeTooLarge
                            | C::TopicAuthorizationFailed
                            | C::InvalidRecord
                            | C::UnknownTopicOrPartition,
                        ) => Err(DeliveryError::Permanent(reason)),
                        _ => Err(DeliveryError::Transient {
                            reason,
                            retry_after: None,
                        }),
                    }
                }
            }
        })
    }

    fn sends_stored(&self, job: &Job) -> bool {
        job.message().is_some()
    }

    fn pace_key(&self, _job: &Job) -> Option<String> {
        None
    }
}
