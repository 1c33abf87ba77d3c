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

/// How a run's event ids are ordered, which decides where each insert lands in the receiver's primary key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum IdOrder {
    /// The run's prefix, then the event's index: consecutive events sort together, as Stripe's and
    /// Standard Webhooks' time-ordered ids do.
    #[default]
    Sequential,
    /// Drawn from a hash of the run and the index, so consecutive events sort far apart, as random
    /// (version 4) UUIDs do (for the GitHub scheme they are shaped as such). Still the same for the same index.
    Random,
    /// Time-based (version 1) UUIDs, as GitHub's delivery GUIDs are: the event's due time, at the run's
    /// rate, in 100 ns units. Their text leads with the clock's low 32 bits, which wrap every ~7.2 minutes,
    /// so the insertion point sweeps through the whole primary key once per wrap.
    TimeUuid,
}

/// 100 ns intervals from the UUID epoch (1582-10-15) to the Unix epoch.
const UUID_EPOCH_OFFSET: u64 = 0x01b2_1dd2_1381_4000;

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
    id_order: IdOrder,
    /// For `IdOrder::TimeUuid`: the step between events, in 100 ns units (the first is at `created_base`),
    /// and the UUIDs' last two groups (clock sequence and node, from the run id).
    uuid_step: u64,
    uuid_node: String,
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
            id_order: IdOrder::Sequential,
            uuid_step: 1_000,
            uuid_node: String::new(),
            padding: "abcdefghijklmnopqrstuvwxyz0123456789".repeat((size + PAD_PERIOD as usize) / 36 + 2),
        })
    }

    /// Orders the run's event ids as `order` says (sequential unless set). Time-based ids advance by
    /// 1/`per_second` from event to event, from the run's start (10,000 a second when not positive).
    #[must_use]
    pub fn with_id_order(mut self, order: IdOrder, per_second: f64) -> Self {
        self.id_order = order;
        let per_second = if per_second > 0.0 { per_second } else { 10_000.0 };
        // Saturating float-to-int conversion; at least one tick apart, so that ids never repeat.
        self.uuid_step = ((10_000_000.0 / per_second) as u64).max(1);
        let node = Sha256::digest(self.run_id.as_bytes());
        self.uuid_node = format!("{:04x}-", 0x8000 | (u16::from_be_bytes([node[0], node[1]]) & 0x3fff));
        for byte in &node[2..8] {
            let _ = write!(self.uuid_node, "{byte:02x}");
        }
        self
    }

    pub fn event_id(&self, index: u64) -> String {
        match self.id_order {
            IdOrder::Sequential => {}
            IdOrder::Random => return self.random_event_id(index),
            IdOrder::TimeUuid => return self.time_uuid(index),
        }
        match self.scheme {
            Scheme::Stripe => format!("evt_{}_{index}", self.run_id),
            Scheme::Standard => format!("msg_{}_{index}", self.run_id),
            Scheme::Github => format!("{}-{index:012}", self.run_id),
        }
    }

    /// A random-looking id that is still a function of (run, index): a duplicate resends the same one.
    fn random_event_id(&self, index: u64) -> String {
        let digest = Sha256::new().chain_update(self.run_id.as_bytes()).chain_update(index.to_le_bytes()).finalize();
        let mut hex = String::with_capacity(32);
        for byte in &digest[..16] {
            let _ = write!(hex, "{byte:02x}");
        }
        match self.scheme {
            Scheme::Stripe => format!("evt_{}", &hex[..24]),
            Scheme::Standard => format!("msg_{}", &hex[..24]),
            // A version-4 UUID's layout: the version digit 4, and the variant's top bits 10 (8, 9, a or b).
            Scheme::Github => {
                let variant = ["8", "9", "a", "b"][usize::from(digest[8] & 3)];
                format!("{}-{}-4{}-{variant}{}-{}", &hex[..8], &hex[8..12], &hex[13..16], &hex[17..20], &hex[20..32])
            }
        }
    }

    /// A version-1 UUID at the event's due time, ending in the run's clock sequence and node (one sender).
    fn time_uuid(&self, index: u64) -> String {
        let start = UUID_EPOCH_OFFSET + u64::try_from(self.created_base).unwrap_or(0) * 10_000_000;
        let t = start.wrapping_add(index.wrapping_mul(self.uuid_step));
        format!(
            "{:08x}-{:04x}-{:04x}-{}",
            t & 0xffff_ffff,
            (t >> 32) & 0xffff,
            0x1000 | ((t >> 48) & 0x0fff),
            self.uuid_node
        )
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

    /// The request's headers as the gateway receives them.
    fn header_map(prepared: &Prepared) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in &prepared.headers {
            headers.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

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
            let headers = header_map(&p);
            let verifier = Verifier::new(scheme, &[secret], 300).unwrap();
            assert_eq!(verifier.verify(&headers, &p.body, 1_700_000_001), Ok(()), "{scheme}");
            let event = hookgate::event::parse(scheme, &headers, &p.body).unwrap();
            assert_eq!(event.id, p.event_id);
            let bad = f.prepare(7, Kind::BadSignature, 1_700_000_000);
            let headers = header_map(&bad);
            assert!(verifier.verify(&headers, &bad.body, 1_700_000_001).is_err());
        }
    }

    #[test]
    fn random_ids_are_stable_distinct_unordered_and_accepted_by_the_gateway() {
        for (scheme, secret) in
            [(Scheme::Stripe, "whsec_x"), (Scheme::Standard, "whsec_AAECAwQF"), (Scheme::Github, "g")]
        {
            let f = factory(scheme, secret).with_id_order(IdOrder::Random, 1000.0);
            let ids: Vec<String> = (0..1000).map(|i| f.event_id(i)).collect();
            assert_eq!(ids[7], f.event_id(7), "a duplicate must resend the same id");
            assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), ids.len());
            // Sequential ids of one run sort together; random ones land all over the key space.
            let ascending = ids.windows(2).filter(|pair| pair[0] < pair[1]).count();
            assert!((300..700).contains(&ascending), "{scheme}: {ascending} of 999 pairs ascending");
            let other_run = PayloadFactory::new(scheme, secret, "r2".into(), vec!["a.b".into()], 1024, None, 0)
                .unwrap()
                .with_id_order(IdOrder::Random, 1000.0);
            assert_ne!(other_run.event_id(7), ids[7]);
            if scheme == Scheme::Github {
                let groups: Vec<usize> = ids[7].split('-').map(str::len).collect();
                assert_eq!(groups, [8, 4, 4, 4, 12], "{}", ids[7]);
                assert_eq!(&ids[7][14..15], "4", "version 4: {}", ids[7]);
                assert!("89ab".contains(&ids[7][19..20]), "variant: {}", ids[7]);
            }
            let p = f.prepare(7, Kind::Fresh, 1_700_000_000);
            assert_eq!(p.event_id, ids[7]);
            let headers = header_map(&p);
            assert_eq!(hookgate::event::parse(scheme, &headers, &p.body).unwrap().id, ids[7]);
        }
        let sequential = factory(Scheme::Stripe, "whsec_x");
        assert_eq!(sequential.event_id(7), "evt_r1_7");
    }

    #[test]
    fn time_uuids_carry_the_due_time_and_wrap_their_leading_digits() {
        // The factory starts at 1,700,000,000 s (Unix); at 10,000 events a second, one event is 1,000 ticks.
        let f = factory(Scheme::Github, "g").with_id_order(IdOrder::TimeUuid, 10_000.0);
        let first = f.event_id(0);
        let groups: Vec<&str> = first.split('-').collect();
        assert_eq!(groups.iter().map(|g| g.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12], "{first}");
        assert!(groups[2].starts_with('1'), "version 1: {first}");
        assert!("89ab".contains(&groups[3][..1]), "variant: {first}");
        let ticks = |id: &str| {
            let g: Vec<&str> = id.split('-').collect();
            let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
            ((hex(g[2]) & 0x0fff) << 48) | (hex(g[1]) << 32) | hex(g[0])
        };
        assert_eq!(ticks(&first), UUID_EPOCH_OFFSET + 1_700_000_000 * 10_000_000);
        assert_eq!(ticks(&f.event_id(10_000)) - ticks(&first), 10_000_000, "one second later");
        assert_eq!(f.event_id(5), f.event_id(5));
        assert_eq!(&f.event_id(5)[19..], &first[19..], "one sender: the same clock sequence and node");
        // Within a wrap of the low 32 bits the text order is the time order; at the wrap, it restarts low.
        let low = (UUID_EPOCH_OFFSET + 1_700_000_000 * 10_000_000) & 0xffff_ffff;
        let wrap = ((1u64 << 32) - low).div_ceil(1_000);
        assert!((wrap - 1_000..wrap - 1).all(|i| f.event_id(i) < f.event_id(i + 1)), "rising before the wrap");
        assert!(f.event_id(wrap) < f.event_id(wrap - 1), "restarting at the wrap");
        assert!(f.event_id(wrap).starts_with("00"), "{}", f.event_id(wrap));
        assert!((wrap..wrap + 1_000).all(|i| f.event_id(i) < f.event_id(i + 1)), "rising again after it");
        let p = f.prepare(5, Kind::Fresh, 1_700_000_000);
        let headers = header_map(&p);
        assert_eq!(hookgate::event::parse(Scheme::Github, &headers, &p.body).unwrap().id, f.event_id(5));
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
