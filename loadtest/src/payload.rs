//! Request bodies and signatures: a deterministic body per event index (so a duplicate resends the exact
//! same bytes), signed afresh at send time with the scheme's headers.

use std::fmt::Write as _;

use hookgate::signature::{Scheme, Verifier};
use sha2::{Digest, Sha256};

/// What kind of request a ticket becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A new event with a unique id.
    Fresh,
    /// A resend of an earlier event (same id and body): the receiver should answer 2xx and store nothing new.
    Duplicate,
    /// Signed with the wrong secret: the receiver must refuse it.
    BadSignature,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Fresh => "fresh",
            Kind::Duplicate => "duplicate",
            Kind::BadSignature => "bad_signature",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fresh" => Some(Kind::Fresh),
            "duplicate" => Some(Kind::Duplicate),
            "bad_signature" => Some(Kind::BadSignature),
            _ => None,
        }
    }
}

/// A built request: headers and body, plus what the results file records about it.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub event_id: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: bytes::Bytes,
    /// First 16 hex digits of the body's SHA-256, for the loss audit's exact-body check.
    pub body_hash: String,
}

/// Builds the bodies of one run.
#[derive(Debug, Clone)]
pub struct PayloadFactory {
    scheme: Scheme,
    signer: Verifier,
    wrong_signer: Verifier,
    run_id: String,
    event_types: Vec<String>,
    size: usize,
    template: Option<String>,
    created_base: i64,
    /// Padding text, long enough for one copy per body; bodies start at different offsets.
    padding: String,
}

/// Bodies of consecutive events start their padding at offsets cycling through this period.
const PAD_PERIOD: u64 = 97;

impl PayloadFactory {
    pub fn new(
        scheme: Scheme,
        secret: &str,
        run_id: String,
        event_types: Vec<String>,
        size: usize,
        template: Option<String>,
        created_base: i64,
    ) -> Result<Self, hookgate::signature::InvalidSecret> {
        let wrong = match scheme {
            Scheme::Standard => "whsec_d3JvbmctbG9hZHRlc3Qtc2VjcmV0",
            _ => "whsec_wrong_loadtest_secret",
        };
        Ok(Self {
            scheme,
            signer: Verifier::new(scheme, &[secret], 300)?,
            wrong_signer: Verifier::new(scheme, &[wrong], 300)?,
            run_id,
            event_types: if event_types.is_empty() { vec!["payment_intent.succeeded".into()] } else { event_types },
            size,
            template,
            created_base,
            padding: "abcdefghijklmnopqrstuvwxyz0123456789".repeat((size + PAD_PERIOD as usize) / 36 + 2),
        })
    }

    pub fn event_id(&self, index: u64) -> String {
        match self.scheme {
            Scheme::Stripe => format!("evt_{}_{index}", self.run_id),
            Scheme::Standard => format!("msg_{}_{index}", self.run_id),
            Scheme::Github => format!("{}-{index:012}", self.run_id),
        }
    }

    /// The body of event `index`: the same bytes every time it is built.
    pub fn body(&self, index: u64) -> String {
        let id = self.event_id(index);
        let event_type = &self.event_types[(index % self.event_types.len() as u64) as usize];
        let created = self.created_base + (index / 1000) as i64;
        if let Some(template) = &self.template {
            return template
                .replace("{{id}}", &id)
                .replace("{{created}}", &created.to_string())
                .replace("{{type}}", event_type);
        }
        let (head, tail) = match self.scheme {
            Scheme::Stripe => (
                format!(
                    r#"{{"id":"{id}","object":"event","api_version":"2026-07-29.dahlia","created":{created},"livemode":false,"pending_webhooks":1,"type":"{event_type}","data":{{"object":{{"id":"pi_{index}","object":"payment_intent","amount":{},"currency":"usd","description":""#,
                    1000 + index % 9000
                ),
                r#""}}}"#,
            ),
            Scheme::Standard => (
                format!(
                    r#"{{"type":"{event_type}","timestamp":{created},"data":{{"id":"{id}","amount":{},"description":""#,
                    1000 + index % 9000
                ),
                r#""}}"#,
            ),
            Scheme::Github => (format!(r#"{{"action":"{event_type}","hook_id":{index},"description":""#), r#""}"#),
        };
        let pad = self.size.saturating_sub(head.len() + tail.len());
        let mut body = String::with_capacity(head.len() + pad + tail.len());
        body.push_str(&head);
        // Varied but deterministic padding (a window into a precomputed text, one copy per request).
        let mut remaining = pad;
        let mut offset = (index % PAD_PERIOD) as usize;
        while remaining > 0 {
            let take = remaining.min(self.padding.len() - offset);
            body.push_str(&self.padding[offset..offset + take]);
            remaining -= take;
            offset = 0;
        }
        body.push_str(tail);
        body
    }

    /// Builds the request for event `index`, signed at `now` (unix seconds).
    pub fn prepare(&self, index: u64, kind: Kind, now: i64) -> Prepared {
        let event_id = self.event_id(index);
        let body = self.body(index);
        let signer = if kind == Kind::BadSignature { &self.wrong_signer } else { &self.signer };
        let mut headers = signer.sign(body.as_bytes(), now, &event_id);
        if self.scheme == Scheme::Github {
            let event_type = &self.event_types[(index % self.event_types.len() as u64) as usize];
            headers.push((hookgate::event::GITHUB_DELIVERY, event_id.clone()));
            headers.push((hookgate::event::GITHUB_EVENT, event_type.clone()));
        }
        let body_hash = body_hash(body.as_bytes());
        Prepared { event_id, headers, body: bytes::Bytes::from(body), body_hash }
    }
}

pub fn body_hash(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let mut out = String::with_capacity(16);
    for byte in &digest[..8] {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn factory(scheme: Scheme, secret: &str) -> PayloadFactory {
        PayloadFactory::new(scheme, secret, "r1".into(), vec!["a.b".into(), "c.d".into()], 1024, None, 1_700_000_000)
            .unwrap()
    }

    #[test]
    fn bodies_are_deterministic_sized_and_valid_events() {
        for (scheme, secret) in
            [(Scheme::Stripe, "whsec_x"), (Scheme::Standard, "whsec_AAECAwQF"), (Scheme::Github, "g")]
        {
            let f = factory(scheme, secret);
            assert_eq!(f.body(7), f.body(7));
            assert_ne!(f.body(7), f.body(8));
            assert_eq!(f.body(7).len(), 1024);
            let p = f.prepare(7, Kind::Fresh, 1_700_000_000);
            let mut headers = HeaderMap::new();
            for (k, v) in &p.headers {
                headers.insert(*k, HeaderValue::from_str(v).unwrap());
            }
            let verifier = Verifier::new(scheme, &[secret], 300).unwrap();
            assert_eq!(verifier.verify(&headers, &p.body, 1_700_000_001), Ok(()), "{scheme}");
            let event = hookgate::event::parse(scheme, &headers, &p.body).unwrap();
            assert_eq!(event.id, p.event_id);
            let bad = f.prepare(7, Kind::BadSignature, 1_700_000_000);
            let mut headers = HeaderMap::new();
            for (k, v) in &bad.headers {
                headers.insert(*k, HeaderValue::from_str(v).unwrap());
            }
            assert!(verifier.verify(&headers, &bad.body, 1_700_000_001).is_err());
        }
    }

    #[test]
    fn template_placeholders_are_filled() {
        let f = PayloadFactory::new(
            Scheme::Stripe,
            "whsec_x",
            "r".into(),
            vec!["t.x".into()],
            0,
            Some(r#"{"id":"{{id}}","object":"event","type":"{{type}}","created":{{created}}}"#.into()),
            5,
        )
        .unwrap();
        assert_eq!(f.body(3), r#"{"id":"evt_r_3","object":"event","type":"t.x","created":5}"#);
    }
}
