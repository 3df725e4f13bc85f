//! SQL helpers of the HQ sink: quoting, statement sizes that repeat (prepared statements are
//! cached by text), and value formats.

use crate::SinkError;

/// The step of [`stable_chunks`]' sizes below the maximum.
pub(super) const CHUNK_STEP: usize = 32;

/// Splits `items` into chunks whose sizes repeat from batch to batch: `max` as often as it fits,
/// then a multiple of [`CHUNK_STEP`], then what is left (fewer than the step). Every distinct
/// size is its own prepared statement (the connection caches them by text), so a batch's
/// partial chunks do not make the server parse a new multi-row statement each time, and a
/// table's rows take at most two statements besides the full ones (powers of two took up to
/// ten, each a round trip with its own overhead at HQ).
pub(super) fn stable_chunks<T>(items: &[T], max: usize) -> Vec<&[T]> {
    let max = max.max(1);
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let n = if rest.len() >= max {
            max
        } else if rest.len() >= CHUNK_STEP {
            rest.len() / CHUNK_STEP * CHUNK_STEP
        } else {
            rest.len()
        };
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
    }
    out
}

/// The number of placeholders of an `IN (…)` list for `n` keys: the next power of two (up to
/// `max`), so that lookups reuse a few prepared statements. The list is padded by repeating a
/// key, which does not change the result.
pub(super) fn padded_len(n: usize, max: usize) -> usize {
    n.next_power_of_two().min(max).max(n)
}

/// `ids` as the text of an SQL list (`1,2,3`).
pub(super) fn id_list<'a>(ids: impl IntoIterator<Item = &'a i64>) -> String {
    ids.into_iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

pub(super) fn db(context: &str) -> impl FnOnce(mysql_async::Error) -> SinkError + '_ {
    move |e| SinkError::db(context, e)
}

/// A quoted SQL identifier.
pub(crate) fn q(id: &str) -> String {
    format!("`{}`", id.replace('`', "``"))
}

/// `ms` as a DATETIME literal value (UTC).
pub(super) fn datetime(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "1970-01-01 00:00:00".into())
}

pub(super) fn is_binary_type(t: &str) -> bool {
    let t = t.to_ascii_lowercase();
    t.contains("blob") || t.contains("binary")
}

#[cfg(test)]
mod tests {
    use super::{padded_len, stable_chunks, CHUNK_STEP};

    #[test]
    fn stable_chunks_cover_everything_in_order_with_few_sizes() {
        for n in [0usize, 1, 2, 3, 7, 999, 1000, 1001, 4321, 5000] {
            let items: Vec<usize> = (0..n).collect();
            let chunks = stable_chunks(&items, 1000);
            let flat: Vec<usize> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(flat, items, "n = {n}");
            for c in &chunks {
                assert!(c.len() == 1000 || c.len() % CHUNK_STEP == 0 || c.len() < CHUNK_STEP, "n = {n}: chunk of {}", c.len());
            }
            assert!(chunks.iter().filter(|c| c.len() != 1000).count() <= 2, "n = {n}");
        }
        assert_eq!(stable_chunks(&[0u8; 4321], 1000).iter().map(|c| c.len()).collect::<Vec<_>>(), vec![1000, 1000, 1000, 1000, 320, 1]);
        assert_eq!(stable_chunks(&[0u8; 167], 1000).iter().map(|c| c.len()).collect::<Vec<_>>(), vec![160, 7]);
        assert_eq!(padded_len(5, 1000), 8);
        assert_eq!(padded_len(600, 1000), 1000);
        assert_eq!(padded_len(1000, 1000), 1000);
    }
}
