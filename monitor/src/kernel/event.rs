//! Decoding ring-buffer records into typed events.
use monitor_common::{Event, kind, tcp};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes, expected {size}", size = std::mem::size_of::<Event>())]
    Size(usize),
    #[error("record of unknown kind {0}")]
    Kind(u8),
    #[error("record with impossible state {0} -> {1}")]
    State(u8, u8),
}

/// Checks and copies one record. The kernel programs and the agent are built together, so a
/// bad record means memory corruption or a mismatched build: it is counted, never trusted.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() != std::mem::size_of::<Event>() {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: the length is checked; Event is plain data valid for any bit pattern;
    // read_unaligned makes no alignment assumption about the ring buffer.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    if !matches!(
        ev.kind,
        kind::TRANSITION
            | kind::TW_CANCEL
            | kind::REARM
            | kind::UNTRACKED_END
            | kind::CLOSE_WAIT_AGE
            | kind::MISSED_END
    ) {
        return Err(DecodeError::Kind(ev.kind));
    }
    let valid = |s: u8| s >= tcp::ESTABLISHED && (s as u32) < tcp::MAX_STATES;
    if !valid(ev.from) || !valid(ev.to) {
        return Err(DecodeError::State(ev.from, ev.to));
    }
    Ok(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(ev: &Event) -> Vec<u8> {
        // SAFETY: Event is repr(C) plain data without padding.
        unsafe {
            std::slice::from_raw_parts(
                (ev as *const Event).cast::<u8>(),
                std::mem::size_of::<Event>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn round_trip() {
        let ev = Event {
            ts_ns: 42,
            duration_ns: 7,
            obj: 0xffff_8880_1234_5678,
            netns: 4026531840,
            kind: kind::TRANSITION,
            from: tcp::FIN_WAIT2,
            to: tcp::TIME_WAIT,
            family: 2,
            sport: 40000,
            dport: 80,
            saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..Event::default()
        };
        let mut b = vec![0u8]; // misalign on purpose
        b.extend(bytes(&ev));
        assert_eq!(decode(&b[1..]), Ok(ev));
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[0u8; 10]), Err(DecodeError::Size(10)));
        let mut ev = Event { kind: 99, from: 1, to: 7, ..Event::default() };
        assert_eq!(decode(&bytes(&ev)), Err(DecodeError::Kind(99)));
        ev.kind = kind::TRANSITION;
        ev.to = 200;
        assert_eq!(decode(&bytes(&ev)), Err(DecodeError::State(1, 200)));
    }
}
