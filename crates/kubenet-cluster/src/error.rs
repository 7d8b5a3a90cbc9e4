//! Config errors a user can act on: each names the file, line, column and key. Pure.

use std::fmt;
use std::path::PathBuf;

/// Where a config came from; errors and `kubenet config` name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    /// The reference lab compiled into the binary.
    Embedded,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Embedded => f.write_str("<built-in reference lab>"),
        }
    }
}

/// One thing wrong with a config, at a place in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column of the offending value (or key), 0 when the problem is the file
    /// as a whole (for example "no VMs").
    pub line: usize,
    pub column: usize,
    /// The key path, TOML style: `network.subnet`, `group[2].memory`.
    pub key: String,
    pub message: String,
}

/// Everything wrong with one config file, in file order.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render(.file, .problems))]
    Invalid { file: Source, problems: Vec<Problem> },
}

impl ConfigError {
    /// The problems, for tests and tools; empty for a read error.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            ConfigError::Read { .. } => &[],
        }
    }
}

fn render(source: &Source, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        // The `file:line:column:` form editors and terminals turn into links.
        out.push_str(&format!("{source}:{}:{}: {}: {}", p.line, p.column, p.key, p.message));
    }
    out
}

/// Turns byte offsets into 1-based line and column (in characters).
pub(crate) struct LineIndex<'a> {
    text: &'a str,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        Self { text }
    }

    pub(crate) fn locate(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..self.text.floor_char_boundary(offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    /// The key written on the line holding `offset` (`memory` in `memory = "2X"`), for syntax
    /// errors that come with a position but no key path.
    pub(crate) fn key_on_line(&self, offset: usize) -> Option<String> {
        let offset = self.text.floor_char_boundary(offset.min(self.text.len()));
        let start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let end = self.text[offset..].find('\n').map_or(self.text.len(), |i| offset + i);
        let line = &self.text[start..end];
        let (key, _) = line.split_once('=')?;
        let key = key.trim();
        (!key.is_empty() && !key.starts_with('#')).then(|| key.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_counts_lines_and_characters() {
        let idx = LineIndex::new("a = 1\nbé = \"x\"\n");
        assert_eq!(idx.locate(0), (1, 1));
        assert_eq!(idx.locate(6), (2, 1));
        // After the two-byte é, the column counts characters, not bytes.
        assert_eq!(idx.locate(9), (2, 3));
        assert_eq!(idx.key_on_line(9).as_deref(), Some("bé"));
        assert_eq!(idx.key_on_line(0).as_deref(), Some("a"));
    }

    #[test]
    fn rendering_names_file_line_column_and_key() {
        let e = ConfigError::Invalid {
            file: Source::File("lab.toml".into()),
            problems: vec![Problem { line: 3, column: 10, key: "network.subnet".into(), message: "bad".into() }],
        };
        assert_eq!(e.to_string(), "lab.toml:3:10: network.subnet: bad");
    }
}
