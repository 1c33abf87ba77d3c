//! The event model and its parser: only the few fields hookgate needs, borrowed from the body, pure.
//!
//! serde skips every other field without building a JSON tree. Values are checked to be storable
//! (no control characters, bounded length) here, so a hostile body is refused with a 400 and can never
//! make a whole batch fail in Postgres.

use std::borrow::Cow;

use http::HeaderMap;
use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Deserialize;

use crate::signature::Scheme;

/// Longest event id or type accepted (bytes). Stripe ids are ~30 characters.
pub const MAX_ID_LEN: usize = 255;

/// Deepest nesting of objects and arrays accepted. Real payment events nest a handful of levels; a body
/// nested thousands deep is an attack on whoever parses it downstream.
pub const MAX_DEPTH: usize = 64;

pub const GITHUB_DELIVERY: &str = "x-github-delivery";
pub const GITHUB_EVENT: &str = "x-github-event";

/// The fields of one event that hookgate stores beside the raw body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    pub id: Cow<'a, str>,
    pub event_type: Cow<'a, str>,
    /// Unix seconds at which the sender created the event, when it says.
    pub created: Option<i64>,
    pub livemode: Option<bool>,
    pub api_version: Option<Cow<'a, str>>,
    /// Stripe account the event belongs to: Connect's `account`, else `context`.
    pub account: Option<Cow<'a, str>>,
}

/// Stripe's `object` of a snapshot event, the kind a v1 webhook endpoint receives.
pub const STRIPE_SNAPSHOT_OBJECT: &str = "event";
/// Stripe's `object` of a thin event, sent by an event destination for API v2 resources (and v1 ones on
/// request): unversioned, no `data` snapshot, `created` as an RFC 3339 time, the account in `context`.
pub const STRIPE_THIN_OBJECT: &str = "v2.core.event";

/// Why a verified body is not an event of its source's scheme (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// Not UTF-8, not JSON, not an object, a duplicated key, or a field of the wrong type.
    #[error("the body is not a JSON event: {0}")]
    NotJson(String),
    #[error("the event has no `{0}`")]
    Missing(&'static str),
    #[error("`object` is `{0}`, expected `event` or `v2.core.event`")]
    NotAnEvent(String),
    #[error("`{0}` is empty, too long or holds control characters")]
    Invalid(&'static str),
    #[error("the body nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

impl EventError {
    /// Every kind, as [`EventError::kind`] names them (for metric series that exist from the start).
    pub const KINDS: [&'static str; 5] = ["not_json", "missing_field", "not_an_event", "invalid_field", "too_deep"];

    /// A fixed word for the metric label: never request text.
    pub fn kind(&self) -> &'static str {
        match self {
            EventError::NotJson(_) => "not_json",
            EventError::Missing(_) => "missing_field",
            EventError::NotAnEvent(_) => "not_an_event",
            EventError::Invalid(_) => "invalid_field",
            EventError::TooDeep => "too_deep",
        }
    }
}

/// Refuses bodies nested deeper than [`MAX_DEPTH`]: one pass over the bytes, skipping strings.
fn check_depth(body: &[u8]) -> Result<(), EventError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in body {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(EventError::TooDeep);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// A JSON string borrowed from the body when it has no escapes (serde only borrows a `Cow` that is the
/// direct field type, not one inside an `Option`, hence this newtype).
#[derive(Deserialize)]
#[serde(transparent)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(Deserialize)]
struct StripeBody<'a> {
    #[serde(borrow)]
    id: Option<Text<'a>>,
    #[serde(borrow)]
    object: Option<Text<'a>>,
    #[serde(borrow, rename = "type")]
    event_type: Option<Text<'a>>,
    created: Option<Created>,
    livemode: Option<bool>,
    #[serde(borrow)]
    api_version: Option<Text<'a>>,
    #[serde(borrow)]
    account: Option<Text<'a>>,
    /// The account that generated the event: a thin event's only account field; snapshot events carry it
    /// too since API version 2025-04-30 (beside `account` in a Connect event).
    #[serde(borrow)]
    context: Option<Text<'a>>,
}

/// Stripe's `created` in Unix seconds: a number in a snapshot event, an RFC 3339 time in a thin one
/// (`2024-09-17T06:20:52.246Z`, truncated to the second).
struct Created(i64);

impl<'de> Deserialize<'de> for Created {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CreatedVisitor;
        impl Visitor<'_> for CreatedVisitor {
            type Value = Created;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("Unix seconds or an RFC 3339 time")
            }
            fn visit_i64<E: de::Error>(self, seconds: i64) -> Result<Created, E> {
                Ok(Created(seconds))
            }
            fn visit_u64<E: de::Error>(self, seconds: u64) -> Result<Created, E> {
                i64::try_from(seconds).map(Created).map_err(|_| E::invalid_value(Unexpected::Unsigned(seconds), &self))
            }
            fn visit_str<E: de::Error>(self, time: &str) -> Result<Created, E> {
                humantime::parse_rfc3339(time)
                    .ok()
                    .and_then(crate::unix_seconds)
                    .map(Created)
                    .ok_or_else(|| E::invalid_value(Unexpected::Str(time), &self))
            }
        }
        deserializer.deserialize_any(CreatedVisitor)
    }
}

#[derive(Deserialize)]
struct TypedBody<'a> {
    #[serde(borrow, rename = "type")]
    event_type: Option<Text<'a>>,
}

/// Extracts the event from a body (and, for Standard Webhooks and GitHub, its headers).
pub fn parse<'a>(scheme: Scheme, headers: &'a HeaderMap, body: &'a [u8]) -> Result<Event<'a>, EventError> {
    // JSON is UTF-8 (RFC 8259); serde does not check the strings it skips, so check the whole body once.
    if std::str::from_utf8(body).is_err() {
        return Err(EventError::NotJson("the body is not valid UTF-8".into()));
    }
    check_depth(body)?;
    let event = match scheme {
        Scheme::Stripe => parse_stripe(body)?,
        Scheme::Standard => {
            let id = header_text(headers, crate::signature::STANDARD_ID).ok_or(EventError::Missing("webhook-id"))?;
            let typed: TypedBody<'a> = from_json(body)?;
            Event {
                id: Cow::Borrowed(id),
                event_type: typed.event_type.ok_or(EventError::Missing("type"))?.0,
                created: None,
                livemode: None,
                api_version: None,
                account: None,
            }
        }
        Scheme::Github => {
            let id = header_text(headers, GITHUB_DELIVERY).ok_or(EventError::Missing("X-GitHub-Delivery"))?;
            let event_type = header_text(headers, GITHUB_EVENT).ok_or(EventError::Missing("X-GitHub-Event"))?;
            // GitHub bodies are JSON objects; refuse anything else so the stored body is always an event.
            let _: serde::de::IgnoredAny = from_json(body)?;
            if body.iter().find(|b| !b.is_ascii_whitespace()).is_none_or(|b| *b != b'{') {
                return Err(EventError::NotJson("expected an object".into()));
            }
            Event {
                id: Cow::Borrowed(id),
                event_type: Cow::Borrowed(event_type),
                created: None,
                livemode: None,
                api_version: None,
                account: None,
            }
        }
    };
    check_storable("id", &event.id, true)?;
    check_storable("type", &event.event_type, true)?;
    if let Some(v) = &event.api_version {
        check_storable("api_version", v, false)?;
    }
    if let Some(v) = &event.account {
        check_storable("account", v, false)?;
    }
    Ok(event)
}

fn parse_stripe(body: &[u8]) -> Result<Event<'_>, EventError> {
    let raw: StripeBody<'_> = from_json(body)?;
    let object = raw.object.ok_or(EventError::Missing("object"))?.0;
    if object != STRIPE_SNAPSHOT_OBJECT && object != STRIPE_THIN_OBJECT {
        return Err(EventError::NotAnEvent(object.chars().take(40).collect()));
    }
    Ok(Event {
        id: raw.id.ok_or(EventError::Missing("id"))?.0,
        event_type: raw.event_type.ok_or(EventError::Missing("type"))?.0,
        created: raw.created.map(|c| c.0),
        livemode: raw.livemode,
        api_version: raw.api_version.map(|t| t.0),
        account: raw.account.or(raw.context).map(|t| t.0),
    })
}

fn from_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, EventError> {
    serde_json::from_slice(body).map_err(|e| EventError::NotJson(e.to_string()))
}

fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name)?.to_str().ok().map(str::trim).filter(|s| !s.is_empty())
}

/// Postgres `text` refuses NUL, and control characters in ids would forge log lines: refuse both.
fn check_storable(field: &'static str, value: &str, required: bool) -> Result<(), EventError> {
    let bad = (required && value.is_empty()) || value.len() > MAX_ID_LEN || value.chars().any(char::is_control);
    if bad {
        Err(EventError::Invalid(field))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    #[test]
    fn every_error_kind_is_listed_for_the_metric_series_that_exist_from_the_start() {
        let errors = [
            EventError::NotJson(String::new()),
            EventError::Missing("id"),
            EventError::NotAnEvent(String::new()),
            EventError::Invalid("id"),
            EventError::TooDeep,
        ];
        let kinds: Vec<&str> = errors.iter().map(EventError::kind).collect();
        assert_eq!(kinds, EventError::KINDS);
    }

    fn stripe(body: &str) -> Result<Event<'_>, EventError> {
        static EMPTY: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
        parse(Scheme::Stripe, EMPTY.get_or_init(HeaderMap::new), body.as_bytes())
    }

    #[test]
    fn stripe_event_fields_are_extracted_and_borrowed() {
        let body = r#"{"id":"evt_1","object":"event","type":"charge.succeeded","created":1700000000,
            "livemode":true,"api_version":"2024-06-20","account":"acct_9","data":{"object":{"id":"ch_1","nested":[1,2,{"a":null}]}}}"#;
        let e = stripe(body).unwrap();
        assert_eq!(e.id, "evt_1");
        assert!(matches!(e.id, Cow::Borrowed(_)));
        assert_eq!(e.event_type, "charge.succeeded");
        assert_eq!(e.created, Some(1_700_000_000));
        assert_eq!(e.livemode, Some(true));
        assert_eq!(e.api_version.as_deref(), Some("2024-06-20"));
        assert_eq!(e.account.as_deref(), Some("acct_9"));
    }

    #[test]
    fn a_stripe_thin_event_gives_its_created_time_in_seconds_and_its_context_as_the_account() {
        let body = r#"{"id":"evt_test_65R9Ijk8d","object":"v2.core.event","type":"v1.billing.meter.error_report_triggered",
            "livemode":false,"created":"2024-09-17T06:20:52.246Z","context":"acct_123",
            "related_object":{"id":"mtr_1","type":"billing.meter","url":"/v1/billing/meters/mtr_1"}}"#;
        let e = stripe(body).unwrap();
        assert_eq!(e.id, "evt_test_65R9Ijk8d");
        assert_eq!(e.event_type, "v1.billing.meter.error_report_triggered");
        assert_eq!(e.created, Some(1_726_554_052), "2024-09-17T06:20:52Z");
        assert_eq!(e.livemode, Some(false));
        assert_eq!(e.api_version, None, "thin events are unversioned");
        assert_eq!(e.account.as_deref(), Some("acct_123"));
        // An event destination's ping, with no context.
        let ping = r#"{"id":"evt_ping","object":"v2.core.event","type":"v2.core.event_destination.ping",
            "livemode":false,"created":"2026-09-18T19:56:56Z","context":null,"reason":null}"#;
        let e = stripe(ping).unwrap();
        assert_eq!((e.created, e.account), (Some(1_789_761_416), None));
        // Snapshot events carry `context` too (API 2025-04-30): a Connect event's `account` comes first.
        let connect =
            r#"{"id":"e","object":"event","type":"x","account":"acct_connected","context":"acct_org_member"}"#;
        assert_eq!(stripe(connect).unwrap().account.as_deref(), Some("acct_connected"));
        let organization = r#"{"id":"e","object":"event","type":"x","context":"acct_org_member"}"#;
        assert_eq!(stripe(organization).unwrap().account.as_deref(), Some("acct_org_member"));
    }

    #[test]
    fn created_is_unix_seconds_or_an_rfc_3339_time_and_nothing_else() {
        let with_created = |created: &str| format!(r#"{{"id":"e","object":"event","type":"x","created":{created}}}"#);
        let created = |value: &str| stripe(&with_created(value)).map(|e| e.created);
        assert_eq!(created("null"), Ok(None));
        assert_eq!(created("-1"), Ok(Some(-1)));
        assert_eq!(created(r#""1970-01-01T00:00:00Z""#), Ok(Some(0)));
        for bad in [r#""yesterday""#, r#""1700000000""#, "18446744073709551615", "1.5", "true", "{}"] {
            let body = with_created(bad);
            let refused = stripe(&body);
            assert!(
                matches!(&refused, Err(EventError::NotJson(m)) if m.contains("Unix seconds or an RFC 3339 time")),
                "{bad}: {refused:?}"
            );
        }
    }

    #[test]
    fn stripe_refusals() {
        assert!(matches!(stripe("not json"), Err(EventError::NotJson(_))));
        assert!(matches!(stripe("[1,2]"), Err(EventError::NotJson(_))));
        assert_eq!(stripe(r#"{"object":"event","type":"x"}"#), Err(EventError::Missing("id")));
        assert_eq!(stripe(r#"{"id":"evt_1","type":"x"}"#), Err(EventError::Missing("object")));
        assert_eq!(
            stripe(r#"{"id":"ch_1","object":"charge","type":"x"}"#),
            Err(EventError::NotAnEvent("charge".into()))
        );
        assert_eq!(stripe(r#"{"id":"","object":"event","type":"x"}"#), Err(EventError::Invalid("id")));
        assert_eq!(stripe(r#"{"id":"a\u0000b","object":"event","type":"x"}"#), Err(EventError::Invalid("id")));
        assert_eq!(stripe(r#"{"id":"a\nb","object":"event","type":"x"}"#), Err(EventError::Invalid("id")));
        let long = format!(r#"{{"id":"{}","object":"event","type":"x"}}"#, "a".repeat(300));
        assert_eq!(stripe(&long), Err(EventError::Invalid("id")));
        // A duplicated key is ambiguous (which id is the event?): refused.
        assert!(matches!(stripe(r#"{"id":"a","id":"b","object":"event","type":"x"}"#), Err(EventError::NotJson(_))));
        // Wrong types are refused rather than guessed.
        assert!(matches!(stripe(r#"{"id":5,"object":"event","type":"x"}"#), Err(EventError::NotJson(_))));
    }

    #[test]
    fn invalid_utf8_is_refused_even_where_serde_would_skip_it() {
        let mut body = br#"{"id":"e","object":"event","type":"x","note":""#.to_vec();
        body.extend_from_slice(&[0xff, 0xfe]);
        body.extend_from_slice(br#""}"#);
        assert!(matches!(parse(Scheme::Stripe, &HeaderMap::new(), &body), Err(EventError::NotJson(_))));
    }

    #[test]
    fn escaped_id_is_decoded() {
        let e = stripe(r#"{"id":"evt_\u00e9","object":"event","type":"x"}"#).unwrap();
        assert_eq!(e.id, "evt_é");
    }

    #[test]
    fn standard_and_github_take_ids_from_headers() {
        let mut h = HeaderMap::new();
        h.insert("webhook-id", HeaderValue::from_static("msg_1"));
        let e = parse(Scheme::Standard, &h, br#"{"type":"invoice.paid","data":{}}"#).unwrap();
        assert_eq!((e.id.as_ref(), e.event_type.as_ref()), ("msg_1", "invoice.paid"));
        assert_eq!(parse(Scheme::Standard, &h, br#"{"data":{}}"#), Err(EventError::Missing("type")));
        assert_eq!(
            parse(Scheme::Standard, &HeaderMap::new(), br#"{"type":"x"}"#),
            Err(EventError::Missing("webhook-id"))
        );

        let mut g = HeaderMap::new();
        g.insert("x-github-delivery", HeaderValue::from_static("72d3162e-cc78-11e3-81ab-4c9367dc0958"));
        g.insert("x-github-event", HeaderValue::from_static("push"));
        let e = parse(Scheme::Github, &g, br#"{"ref":"main"}"#).unwrap();
        assert_eq!(e.event_type, "push");
        assert!(matches!(parse(Scheme::Github, &g, b"[]"), Err(EventError::NotJson(_))));
        g.remove("x-github-event");
        assert_eq!(parse(Scheme::Github, &g, b"{}"), Err(EventError::Missing("X-GitHub-Event")));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let nested =
            |n: usize| format!(r#"{{"id":"e","object":"event","type":"x","data":{}{}}}"#, "[".repeat(n), "]".repeat(n));
        assert_eq!(stripe(&nested(100_000)), Err(EventError::TooDeep));
        assert_eq!(stripe(&nested(MAX_DEPTH)), Err(EventError::TooDeep), "the outer object counts as a level");
        assert_eq!(stripe(&nested(MAX_DEPTH - 1)).map(|e| e.id.into_owned()), Ok("e".to_owned()));
        // Brackets inside strings are text, not nesting; an escaped quote does not end the string.
        let in_string = format!(r#"{{"id":"e","object":"event","type":"x","note":"{}"}}"#, "[{".repeat(1000));
        assert!(stripe(&in_string).is_ok());
        let escaped_quote = format!(r#"{{"id":"e","object":"event","type":"x","note":"\"{}"}}"#, "[".repeat(1000));
        assert!(stripe(&escaped_quote).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::signature::fuzz_cases(2048)))]
        #[test]
        fn parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let h = HeaderMap::new();
            for scheme in [Scheme::Stripe, Scheme::Standard, Scheme::Github] {
                let _ = parse(scheme, &h, &body);
            }
        }

        #[test]
        fn parser_never_panics_on_jsonish(body in r#"\{("(id|object|type|created|livemode)":("[^"]{0,8}"|[0-9]{1,3}|true|null),?){0,6}\}"#) {
            let _ = stripe(&body);
        }
    }
}
