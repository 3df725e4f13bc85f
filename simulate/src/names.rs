//! Name and place lists, and the spelling noise that makes cross-site duplicates realistic.

use rand::seq::SliceRandom;
use rand::Rng;

pub const GIVEN_F: &[&str] = &[
    "Amina", "Grace", "Mary", "Faith", "Esther", "Mercy", "Joyce", "Wanjiru", "Achieng", "Nafula",
    "Halima", "Fatuma", "Zawadi", "Rehema", "Neema", "Aisha", "Beatrice", "Catherine", "Dorcas",
    "Eunice", "Florence", "Gladys", "Irene", "Janet", "Lucy", "Miriam", "Nancy", "Pauline", "Rose",
    "Sarah", "Tabitha", "Veronica", "Winnie", "Agnes", "Christine", "Josephine",
];
pub const GIVEN_M: &[&str] = &[
    "John", "Peter", "Joseph", "David", "James", "Samuel", "Daniel", "Moses", "Mohammed", "Ibrahim",
    "Hassan", "Otieno", "Kamau", "Kiprono", "Baraka", "Emmanuel", "Francis", "George", "Isaac",
    "Kevin", "Martin", "Michael", "Patrick", "Paul", "Stephen", "Thomas", "Vincent", "William",
    "Brian", "Charles", "Dennis", "Edward", "Felix", "Geoffrey", "Henry", "Juma",
];
pub const FAMILY: &[&str] = &[
    "Otieno", "Odhiambo", "Ochieng", "Onyango", "Wanjiku", "Kamau", "Mwangi", "Njoroge", "Kariuki",
    "Kiprop", "Cheruiyot", "Kipchumba", "Mutua", "Musyoka", "Wambua", "Omondi", "Akinyi", "Atieno",
    "Hassan", "Abdi", "Mohamed", "Ali", "Mbatha", "Nkosi", "Banda", "Phiri", "Mwale", "Tembo",
    "Okello", "Mugisha", "Nakato", "Ssempijja", "Uwimana", "Habimana", "Niyonzima", "Mensah",
];
pub const CITIES: &[&str] = &[
    "Kisumu", "Nairobi", "Eldoret", "Nakuru", "Mombasa", "Kakamega", "Bungoma", "Busia", "Homa Bay",
    "Kericho", "Kitale", "Machakos", "Meru", "Nyeri", "Siaya", "Migori", "Garissa", "Malindi",
];
pub const COUNTIES: &[&str] =
    &["Kisumu", "Nairobi", "Uasin Gishu", "Nakuru", "Mombasa", "Kakamega", "Bungoma", "Busia"];
pub const NOTE_WORDS: &[&str] = &[
    "patient", "reports", "cough", "fever", "for", "three", "days", "no", "chest", "pain", "advised",
    "fluids", "review", "in", "two", "weeks", "stable", "improving", "headache", "mild", "appetite",
    "good", "adherent", "to", "medication", "counselled", "on", "nutrition",
];

/// A plausible misspelling: drop a doubled letter, swap two neighbours, double a letter, or
/// change a vowel.
pub fn misspell<R: Rng>(rng: &mut R, name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() < 4 {
        return format!("{name}e");
    }
    let i = rng.gen_range(1..chars.len() - 1);
    let mut out = chars.clone();
    match rng.gen_range(0..4) {
        0 => out.swap(i, i + 1),
        1 => out.insert(i, chars[i]),
        2 => {
            out.remove(i);
        }
        _ => {
            let vowels = ['a', 'e', 'i', 'o', 'u'];
            if let Some(pos) = (1..out.len()).find(|&k| vowels.contains(&out[k])) {
                let v = *vowels.iter().filter(|&&v| v != out[pos]).collect::<Vec<_>>().choose(rng).copied().unwrap_or(&'a');
                out[pos] = v;
            } else {
                out.swap(i, i + 1);
            }
        }
    }
    let s: String = out.into_iter().collect();
    if s == name { format!("{name}h") } else { s }
}

/// The National ID as a clerk typed it: same number, different formatting.
pub fn noisy_national_id<R: Rng>(rng: &mut R, canonical: &str) -> String {
    // canonical: "NID" + 9 digits
    let digits = &canonical[3..];
    match rng.gen_range(0..6) {
        0 => canonical.to_string(),
        1 => format!("NID-{}-{}-{}", &digits[0..3], &digits[3..6], &digits[6..9]),
        2 => format!("nid {digits}"),
        3 => format!(" {canonical} "),
        4 => format!("Nid.{}.{}", &digits[0..4], &digits[4..9]),
        _ => format!("nid-{digits}"),
    }
}

/// The National ID as pasted from somewhere else (a message, a spreadsheet, a phone): the same
/// number with Unicode dashes or a minus sign, full-width forms, no-break or zero-width spaces,
/// lower case. The clerk sees the same number; the bytes differ.
pub fn pasted_national_id<R: Rng>(rng: &mut R, canonical: &str) -> String {
    let digits = &canonical[3..];
    let full_width = |s: &str| s.chars().map(|c| if ('!'..='~').contains(&c) { char::from_u32(c as u32 + 0xFEE0).unwrap_or(c) } else { c }).collect::<String>();
    match rng.gen_range(0..7) {
        0 => format!("NID\u{2010}{digits}"),
        1 => format!("NID\u{2013}{}\u{2014}{}", &digits[0..4], &digits[4..]),
        2 => format!("nid\u{2212}{digits}"),
        3 => full_width(canonical),
        4 => format!("{}\u{FF0D}{}", full_width("nid"), full_width(digits)),
        5 => format!("\u{00A0}NID\u{00A0}{digits}\u{202F}"),
        _ => format!("NID\u{200B}{}\u{200D}{}\u{FEFF}", &digits[0..5], &digits[5..]),
    }
}

/// `canonical` with one of its last three digits changed: another person's number that a
/// careless match would take for this one.
pub fn one_digit_apart<R: Rng>(rng: &mut R, canonical: &str) -> String {
    let mut chars: Vec<char> = canonical.chars().collect();
    let i = rng.gen_range(chars.len().saturating_sub(3).max(3)..chars.len());
    let d = chars[i].to_digit(10).unwrap_or(0);
    chars[i] = char::from_digit((d + rng.gen_range(1..10)) % 10, 10).unwrap_or('0');
    chars.into_iter().collect()
}

pub fn note<R: Rng>(rng: &mut R) -> String {
    let n = rng.gen_range(6..16);
    let mut words: Vec<&str> = Vec::with_capacity(n);
    for _ in 0..n {
        words.push(NOTE_WORDS.choose(rng).copied().unwrap_or("stable"));
    }
    let mut s = words.join(" ");
    if let Some(first) = s.get_mut(0..1) {
        first.make_ascii_uppercase();
    }
    s.push('.');
    s
}
