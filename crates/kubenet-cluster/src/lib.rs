//! kubenet's lab definition: one TOML file describes the network and the VMs, and every other
//! part of kubenet (DHCP, DNS, the VM launcher) reads the [`Lab`] resolved from it.
//!
//! Layout:
//! - `raw`: the file as written (serde structs with spans, unknown keys refused).
//! - `resolve`: defaults, ids, MACs and addresses, and the rules across values.
//! - `model`: the resolved [`Lab`], [`Vm`] and friends; what the rest of kubenet uses.
//! - `units`: sizes ("2G") and durations ("12h", "infinite").
//! - `error`: problems located by file, line, column and key.
//!
//! Everything here is pure except [`load`], which reads the one file the lookup order picks.

mod error;
mod model;
mod raw;
mod resolve;
pub mod state;
mod units;

use std::path::{Path, PathBuf};

pub use error::{ConfigError, Problem, Source};
pub use model::{Accelerator, Arch, DhcpRange, Dns, FirmwareChoice, HostEntry, Lab, Login, Mac, Network, Os, Vm};
pub use resolve::{IMAGE_URL, is_dns_label};
pub use units::{Bytes, LeaseTime, parse_duration};

/// The reference lab, compiled in: `kubenet init` writes it and it is used when no file is found.
pub const REFERENCE_CONFIG: &str = include_str!("../../../config/kubenet.toml");

/// The environment variable naming a config file, second in the lookup order.
pub const CONFIG_ENV: &str = "KUBENET_CONFIG";

/// The file name looked for in the current directory, third in the lookup order.
pub const CONFIG_FILE_NAME: &str = "kubenet.toml";

/// Parses and validates a config. `base_dir` is where relative paths (the state directory, the
/// login key) are taken from: the directory holding the file. Reads one file besides the text:
/// the login key, when the config names one (so `config check` refuses what `setup` would).
pub fn parse(text: &str, source: Source, base_dir: &Path) -> Result<Lab, ConfigError> {
    let index = error::LineIndex::new(text);
    let invalid = |problems| ConfigError::Invalid { file: source.clone(), problems };
    let raw = read_raw(text, &index).map_err(invalid)?;
    resolve::resolve(raw, text, source.to_string(), base_dir).map_err(invalid)
}

/// The most type errors one `config check` reports.
const MAX_TYPE_ERRORS: usize = 50;

/// The file as serde structs. serde stops at the first value of the wrong type, so to report
/// them all in one pass the line of each is blanked (spaces, so every other span stays where it
/// was) and the file read again, until it reads or a syntax error ends the search.
fn read_raw(text: &str, index: &error::LineIndex) -> Result<raw::RawLab, Vec<Problem>> {
    let locate = |span: Option<std::ops::Range<usize>>| span.map_or((0, 0), |s| index.locate(s.start));
    let mut text = text.to_owned();
    let mut problems: Vec<Problem> = Vec::new();
    loop {
        let de = match toml::Deserializer::parse(&text) {
            Ok(de) => de,
            // A syntax error of the file as written; one made by blanking ends the search.
            Err(_) if !problems.is_empty() => break,
            Err(e) => {
                let (line, column) = locate(e.span());
                let key = e.span().and_then(|s| index.key_on_line(s.start)).unwrap_or_else(|| "(syntax)".into());
                return Err(vec![Problem { line, column, key, message: e.message().trim().to_string() }]);
            }
        };
        let e = match serde_path_to_error::deserialize::<_, raw::RawLab>(de) {
            Ok(raw) if problems.is_empty() => return Ok(raw),
            Ok(_) => break,
            Err(e) => e,
        };
        // `Spanned` adds a private segment of its own to the path; users never wrote it.
        let path = e.path().to_string().replace(".$__serde_spanned_private_value", "");
        let inner = e.into_inner();
        let message = plain_types(inner.message().trim());
        // At the top level the path is "."; an unknown key there is named only in the message.
        let key = match message.strip_prefix("unknown field `").and_then(|m| m.split_once('`')) {
            Some((field, _)) if path == "." => field.to_string(),
            _ => path,
        };
        let span = inner.span();
        let (line, column) = locate(span.clone());
        problems.push(Problem { line, column, key, message });
        match span {
            Some(span) if problems.len() < MAX_TYPE_ERRORS && blank_lines(&mut text, span.clone()) => {}
            _ => break,
        }
    }
    problems.sort_by_key(|p| (p.line, p.column));
    problems.dedup();
    Err(problems)
}

/// Replaces the lines `span` touches with spaces (newlines kept); false when they were blank.
fn blank_lines(text: &mut String, span: std::ops::Range<usize>) -> bool {
    let start = text[..span.start.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let end = text[span.end.min(text.len())..].find('\n').map_or(text.len(), |i| span.end + i);
    if text[start..end].trim().is_empty() {
        return false;
    }
    let blank: String = text[start..end].chars().map(|c| if c == '\n' { c } else { ' ' }).collect();
    text.replace_range(start..end, &blank);
    true
}

/// serde's messages name Rust types ("expected u32"); the user wrote TOML, so say what fits.
fn plain_types(message: &str) -> String {
    let mut m = message.to_owned();
    for (rust, plain) in [
        ("u8", "a whole number from 0 to 255"),
        ("u16", "a whole number from 0 to 65535"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("u64", "a whole number of 0 or more"),
        ("usize", "a whole number of 0 or more"),
        ("i64", "a whole number"),
    ] {
        m = m.replace(&format!("expected {rust}"), &format!("expected {plain}"));
    }
    m
}

/// Which config the lookup order picked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    File(PathBuf),
    Embedded,
}

/// The lookup order: `--config PATH`, then `$KUBENET_CONFIG`, then `./kubenet.toml`, then the
/// built-in reference lab. `cwd_has_file` tells whether ./kubenet.toml exists; the caller asks the
/// file system so that this stays testable.
pub fn choose(flag: Option<&Path>, env: Option<&std::ffi::OsStr>, cwd_has_file: bool) -> Choice {
    if let Some(p) = flag {
        Choice::File(p.to_path_buf())
    } else if let Some(e) = env.filter(|e| !e.is_empty()) {
        Choice::File(PathBuf::from(e))
    } else if cwd_has_file {
        Choice::File(PathBuf::from(CONFIG_FILE_NAME))
    } else {
        Choice::Embedded
    }
}

/// [`choose`] for a command running in `cwd`: `$KUBENET_CONFIG` from the environment, and
/// whether `cwd/kubenet.toml` exists. The one place every command (and completion) decides.
pub fn choose_in(flag: Option<&Path>, cwd: &Path) -> Choice {
    let env = std::env::var_os(CONFIG_ENV);
    choose(flag, env.as_deref(), cwd.join(CONFIG_FILE_NAME).is_file())
}

/// Reads and resolves the chosen config. The embedded lab's state lives in `cwd`.
pub fn load(choice: &Choice, cwd: &Path) -> Result<Lab, ConfigError> {
    match choice {
        Choice::Embedded => parse(REFERENCE_CONFIG, Source::Embedded, cwd),
        Choice::File(path) => {
            // 1 MiB: the reference lab is 4 KiB; a bigger file is a mistake (or /dev/zero).
            let text = state::read_capped(&cwd.join(path), 1 << 20)
                .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => cwd.join(p),
                _ => cwd.to_path_buf(),
            };
            parse(&text, Source::File(path.clone()), &dir)
        }
    }
}
