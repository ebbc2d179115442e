//! The rules a client's message must meet, checked once, here, after decoding: sizes, counts,
//! finite numbers, labels, rates. A message that breaks one is refused with
//! [`ProtocolError::Invalid`] naming the rule.

use serde::de::DeserializeOwned;

use super::{
    Hello, Kind, PromptRequest, ProtocolError, Subscribe, SubscribeMode, WirePrompt, MAX_NAME_LEN,
    MAX_PROMPTS, MAX_RATE_HZ, MIN_RATE_HZ,
};

/// The body of a `kind` message, or why it is not one.
pub(super) fn decode<T: DeserializeOwned>(kind: Kind, bytes: &[u8]) -> Result<T, ProtocolError> {
    rmp_serde::from_slice(bytes).map_err(|e| ProtocolError::Malformed {
        kind,
        reason: e.to_string(),
    })
}

fn invalid(kind: Kind, reason: String) -> ProtocolError {
    ProtocolError::Invalid { kind, reason }
}

fn check_prompts(kind: Kind, prompts: &[WirePrompt]) -> Result<(), ProtocolError> {
    if prompts.len() > MAX_PROMPTS {
        return Err(invalid(
            kind,
            format!("{} prompts, at most {MAX_PROMPTS}", prompts.len()),
        ));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.points.is_empty() && p.bbox.is_none() {
            return Err(invalid(kind, format!("prompt {i} has no point and no box")));
        }
        if let Err(e) = crate::prompt::check_point_count(p.points.len(), p.bbox.is_some()) {
            return Err(invalid(kind, format!("prompt {i}: {e}")));
        }
        let finite = p
            .points
            .iter()
            .all(|(x, y, _)| x.is_finite() && y.is_finite())
            && p.bbox.is_none_or(|b| b.iter().all(|v| v.is_finite()));
        if !finite {
            return Err(invalid(
                kind,
                format!("prompt {i} has a non-finite coordinate"),
            ));
        }
        if let Some((_, _, label)) = p.points.iter().find(|(_, _, l)| *l > 1) {
            return Err(invalid(
                kind,
                format!("prompt {i} has point label {label}; use 1 (foreground) or 0 (background)"),
            ));
        }
    }
    Ok(())
}

/// A hello with a name of at most [`MAX_NAME_LEN`] bytes and an ordered version range.
pub(super) fn hello(m: Hello) -> Result<Hello, ProtocolError> {
    let k = Kind::Hello;
    if m.client.len() > MAX_NAME_LEN {
        return Err(invalid(k, format!("client name over {MAX_NAME_LEN} bytes")));
    }
    if m.min_version > m.max_version {
        return Err(invalid(k, "min_version > max_version".into()));
    }
    Ok(m)
}

/// A subscription with valid prompts (at least one in `prompts` mode) and a rate of 0 (no
/// limit) or within [`MIN_RATE_HZ`]..=[`MAX_RATE_HZ`].
pub(super) fn subscribe(m: Subscribe) -> Result<Subscribe, ProtocolError> {
    let k = Kind::Subscribe;
    check_prompts(k, &m.prompts)?;
    if m.mode == SubscribeMode::Prompts && m.prompts.is_empty() {
        return Err(invalid(k, "mode prompts needs at least one prompt".into()));
    }
    let rate = m.max_rate_hz;
    if !(rate == 0.0 || (MIN_RATE_HZ..=MAX_RATE_HZ).contains(&rate)) {
        return Err(invalid(
            k,
            format!("max_rate_hz {rate} must be 0 (no limit) or {MIN_RATE_HZ}..={MAX_RATE_HZ}"),
        ));
    }
    Ok(m)
}

/// A prompt request with at least one prompt, all valid.
pub(super) fn prompt_request(m: PromptRequest) -> Result<PromptRequest, ProtocolError> {
    let k = Kind::PromptRequest;
    check_prompts(k, &m.prompts)?;
    if m.prompts.is_empty() {
        return Err(invalid(k, "no prompts".into()));
    }
    Ok(m)
}
