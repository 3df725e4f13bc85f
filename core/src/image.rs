//! Row images: the forms a change event's `key`, `before`, `after` and `refs` can be decoded
//! into ([`Image`]). The JSON is the same whichever form reads it; each stage picks the one it
//! reads fastest:
//! - [`Row`]: a JSON map (tools, tests, the general paths);
//! - [`FlatRow`]: decoded (column, value) pairs in order, column names shared (the HQ sink);
//! - [`RawPairs`]: (column, raw JSON text) pairs borrowed from the record (the Parquet sink,
//!   which types each value from its text);
//! - [`RawImage`]: the whole image's JSON text, borrowed (the transform, which copies images
//!   into its output without reading them).
//!
//! Decoding only; no delivery guarantee of its own.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Mutex;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value as J;

/// A row image: column name → value, in table column order.
pub type Row = serde_json::Map<String, serde_json::Value>;

/// What the envelope needs of whatever holds a row image (`key`, `before`, `after`, `refs`):
/// [`Row`] (a JSON map), [`FlatRow`] (decoded pairs in order), [`RawPairs`] (borrowed raw
/// values in order) or [`RawImage`] (the image's JSON text, borrowed). [`ChangeEvent`] and
/// [`crate::hq::HqEvent`] are generic over it, so each record kind has one decoder and every
/// stage picks the image form it can read fastest.
///
/// [`ChangeEvent`]: crate::envelope::ChangeEvent
pub trait Image: Default {
    /// No columns.
    fn is_empty(&self) -> bool;
}

/// An image whose values are decoded, so a column's value can be looked at.
pub trait RowImage: Image {
    /// The value of a column.
    fn get(&self, col: &str) -> Option<&J>;
}

impl Image for Row {
    fn is_empty(&self) -> bool {
        serde_json::Map::is_empty(self)
    }
}

impl RowImage for Row {
    fn get(&self, col: &str) -> Option<&J> {
        serde_json::Map::get(self, col)
    }
}

/// A row image as (column, value) pairs in the order they came, with the same JSON form and
/// the same meaning as [`Row`] (a repeated column keeps its first place and its last value).
///
/// It is for a reader that decodes many events and looks at each column once or twice: the
/// HQ sink. Decoding builds no hash map per image, and a column name is a `&'static str`
/// shared by every image ([`column_name`]) instead of a `String` per image. A lookup by name
/// is a scan, which for an OpenMRS row (at most a few dozen columns) is as fast as hashing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlatRow(Vec<(Cow<'static, str>, J)>);

impl FlatRow {
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The value of a column.
    pub fn get(&self, col: &str) -> Option<&J> {
        self.0.iter().find(|(k, _)| k == col).map(|(_, v)| v)
    }
    /// The columns and their values, in order.
    pub fn iter(&self) -> FlatIter<'_> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }
}

/// The iterator of [`FlatRow::iter`].
pub type FlatIter<'a> = std::iter::Map<std::slice::Iter<'a, (Cow<'static, str>, J)>, fn(&'a (Cow<'static, str>, J)) -> (&'a str, &'a J)>;

impl<'a> IntoIterator for &'a FlatRow {
    type Item = (&'a str, &'a J);
    type IntoIter = FlatIter<'a>;
    fn into_iter(self) -> FlatIter<'a> {
        self.iter()
    }
}

impl Image for FlatRow {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl RowImage for FlatRow {
    fn get(&self, col: &str) -> Option<&J> {
        FlatRow::get(self, col)
    }
}

impl From<&Row> for FlatRow {
    fn from(r: &Row) -> Self {
        FlatRow(r.iter().map(|(k, v)| (column_name(k), v.clone())).collect())
    }
}

impl Serialize for FlatRow {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k.as_ref(), v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for FlatRow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Image;
        impl<'de> Visitor<'de> for Image {
            type Value = FlatRow;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a row image (a JSON object)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<FlatRow, A::Error> {
                let mut pairs: Vec<(Cow<'static, str>, J)> = Vec::with_capacity(m.size_hint().unwrap_or(16));
                let mut seen = Seen::default();
                while let Some(k) = m.next_key_seed(Name)? {
                    let v: J = m.next_value()?;
                    put(&mut pairs, &mut seen, k, v);
                }
                Ok(FlatRow(pairs))
            }
        }
        d.deserialize_map(Image)
    }
}

/// A column name read straight into [`column_name`], without a `String` in between.
struct Name;

impl<'de> DeserializeSeed<'de> for Name {
    type Value = Cow<'static, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Cow<'static, str>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a column name")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<Self::Value, E> {
                Ok(column_name(s))
            }
        }
        d.deserialize_str(V)
    }
}

/// At most this many distinct column names are shared; past it (a schema cannot have that many,
/// so only bad input gets there) each image has its own copy.
const MAX_SHARED_NAMES: usize = 20_000;
/// Names longer than this are never shared (MariaDB's limit is 64 characters).
const MAX_SHARED_NAME_LEN: usize = 128;

static SHARED_NAMES: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

thread_local! {
    static LOCAL_NAMES: std::cell::RefCell<hashbrown::HashSet<&'static str>> = std::cell::RefCell::new(hashbrown::HashSet::new());
}

/// A column name shared by every row image: the same `&'static str` for the same name, from a
/// per-thread set in front of a process-wide one. The names are kept for the life of the
/// process: a schema's column names are a small, fixed set (a few thousand for OpenMRS), and
/// [`MAX_SHARED_NAMES`] bounds them against bad input.
pub fn column_name(s: &str) -> Cow<'static, str> {
    if s.len() > MAX_SHARED_NAME_LEN {
        return Cow::Owned(s.to_string());
    }
    if let Some(name) = LOCAL_NAMES.with(|l| l.borrow().get(s).copied()) {
        return Cow::Borrowed(name);
    }
    let shared = {
        let mut g = SHARED_NAMES.lock().unwrap_or_else(|p| p.into_inner());
        let set = g.get_or_insert_with(HashSet::new);
        match set.get(s) {
            Some(name) => Some(*name),
            None if set.len() < MAX_SHARED_NAMES => {
                let name: &'static str = Box::leak(s.to_string().into_boxed_str());
                set.insert(name);
                Some(name)
            }
            None => None,
        }
    };
    match shared {
        Some(name) => {
            LOCAL_NAMES.with(|l| l.borrow_mut().insert(name));
            Cow::Borrowed(name)
        }
        None => Cow::Owned(s.to_string()),
    }
}

/// A row image as its JSON text, borrowed from the record: checked to be an object, its
/// values not decoded (a reader that copies the image on as it came).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawImage<'a>(Option<&'a RawValue>);

impl<'a> RawImage<'a> {
    /// The image's JSON text (`{}` for the default, empty image).
    pub fn json(&self) -> &'a str {
        self.0.map_or("{}", RawValue::get)
    }
}

impl Image for RawImage<'_> {
    fn is_empty(&self) -> bool {
        let s = self.json().as_bytes();
        s.get(1..).and_then(|rest| rest.iter().find(|b| !b.is_ascii_whitespace())) == Some(&b'}')
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawImage<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let raw = <&'a RawValue>::deserialize(d)?;
        if !raw.get().starts_with('{') {
            return Err(D::Error::custom(format_args!("invalid type: `{}`, expected a row image (a JSON object)", short(raw.get()))));
        }
        Ok(RawImage(Some(raw)))
    }
}

impl Serialize for RawImage<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0 {
            Some(r) => r.serialize(s),
            None => s.serialize_map(Some(0))?.end(),
        }
    }
}

/// The first characters of a value, for an error message.
fn short(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A row image as (column, raw JSON text) pairs in order, borrowed from the record (a column
/// name is owned only when it has escapes). It means what [`Row`] means: a repeated column
/// keeps its first place and its last value.
#[derive(Debug, Clone, Default)]
pub struct RawPairs<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> RawPairs<'a> {
    /// The raw value of a column.
    pub fn get(&self, col: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == col).map(|(_, v)| *v)
    }
    /// The pair at a place: a reader walking a table's columns in order finds each one next.
    pub fn at(&self, i: usize) -> Option<(&str, &'a RawValue)> {
        self.0.get(i).map(|(k, v)| (k.as_ref(), *v))
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Image for RawPairs<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawPairs<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = RawPairs<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a row image (a JSON object)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<RawPairs<'a>, A::Error> {
                let mut v: Vec<(Cow<'a, str>, &'a RawValue)> = Vec::with_capacity(m.size_hint().unwrap_or(24));
                let mut seen = Seen::default();
                while let Some((k, val)) = m.next_entry::<Key<'de>, &'de RawValue>()? {
                    put(&mut v, &mut seen, k.0, val);
                }
                Ok(RawPairs(v))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl Serialize for RawPairs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k.as_ref(), v)?;
        }
        m.end()
    }
}

/// A column name borrowed from the record when it has no escapes (serde's own `Cow` always
/// copies).
struct Key<'a>(Cow<'a, str>);

/// The column names an image has so far, as a 64-bit filter of (length, last byte): a name
/// whose bit is not set cannot be a repeat, so only the rare name whose bit is set is looked
/// for among the others (a full `obs` image has 30 columns: 435 comparisons without it).
#[derive(Default)]
struct Seen(u64);

impl Seen {
    #[inline(always)]
    fn bit(name: &str) -> u64 {
        let last = name.as_bytes().last().copied().unwrap_or(0) as usize;
        1 << ((name.len() * 7 + last) & 63)
    }
}

/// Appends (name, value), or replaces the value of an earlier pair of that name: a repeated
/// column keeps its first place and its last value, as in a JSON map.
#[inline(always)]
fn put<'a, V>(pairs: &mut Vec<(Cow<'a, str>, V)>, seen: &mut Seen, name: Cow<'a, str>, value: V) {
    let bit = Seen::bit(&name);
    if seen.0 & bit != 0 {
        if let Some(e) = pairs.iter_mut().find(|(c, _)| *c == name) {
            e.1 = value;
            return;
        }
    }
    seen.0 |= bit;
    pairs.push((name, value));
}

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Key<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a column name")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> std::result::Result<Key<'a>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<Key<'a>, E> {
                Ok(Key(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_keeps_a_repeated_column_at_its_first_place_with_its_last_value() {
        // 300 columns, some repeated out of order, and an escaped name that repeats another.
        let mut parts: Vec<String> = (0..300).map(|i| format!("\"c{i}\":{i}")).collect();
        parts.extend((0..300).rev().step_by(7).map(|i| format!("\"c{i}\":\"again {i}\"")));
        parts.push(r#""c\u0031":"escaped""#.to_string());
        let json = format!("{{{}}}", parts.join(","));
        let map: Row = serde_json::from_str(&json).expect("a map");
        let flat: FlatRow = serde_json::from_str(&json).expect("flat");
        let pairs: RawPairs<'_> = serde_json::from_str(&json).expect("pairs");
        let want = serde_json::to_string(&map).expect("serialises");
        assert_eq!(serde_json::to_string(&flat).ok().as_deref(), Some(want.as_str()));
        assert_eq!(serde_json::to_string(&pairs).ok().as_deref(), Some(want.as_str()));
        assert_eq!((flat.len(), pairs.len()), (300, 300));
        assert_eq!(pairs.get("c292").map(RawValue::get), Some(r#""again 292""#));
        assert_eq!(pairs.get("c1").map(RawValue::get), Some(r#""escaped""#));
        assert_eq!(pairs.at(2).map(|(k, v)| (k, v.get())), Some(("c2", "2")));
        // A few columns, where the filter decides: `ab` and `cb` share a bit and stay apart.
        assert_eq!(Seen::bit("ab"), Seen::bit("cb"));
        let small = r#"{"ab":1,"cb":2,"uuid":3,"ab":4}"#;
        let pairs: RawPairs<'_> = serde_json::from_str(small).expect("pairs");
        let flat: FlatRow = serde_json::from_str(small).expect("flat");
        assert_eq!(serde_json::to_string(&pairs).ok().as_deref(), Some(r#"{"ab":4,"cb":2,"uuid":3}"#));
        assert_eq!(serde_json::to_string(&flat).ok().as_deref(), Some(r#"{"ab":4,"cb":2,"uuid":3}"#));
    }
}
