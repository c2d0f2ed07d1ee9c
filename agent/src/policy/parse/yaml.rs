//! Untrusted YAML text → serde types, through serde-saphyr.
//!
//! A stream is first split into its documents with the YAML parser alone
//! (so empty documents keep their number and a syntax error names its
//! document), then each document is deserialized on its own with the
//! field path tracked, so a message says where inside the object it is
//! and on which line of the file.
//!
//! Hostile input is bounded before and while parsing: the caller checks the
//! size; here the number of documents and the nesting depth are capped, and
//! serde-saphyr's budget limits aliases (YAML bombs), nodes and depth again.

use serde::de::DeserializeOwned;
use serde_saphyr::{
    granit_parser::{Event, Parser, ScalarStyle},
    RenderOptions, SnippetMode,
};
use thiserror::Error;

/// Deepest nesting of mappings and sequences a document may have. Real
/// policies need about a dozen levels.
pub const MAX_DEPTH: usize = 64;

/// Most nodes that aliases may add to one document, so a YAML bomb (nested
/// anchors, each aliased many times) stops early. Policies rarely use
/// aliases at all.
pub const MAX_ALIAS_REPLAY: usize = 20_000;

/// What went wrong in one document, as the YAML library reports it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{}{message}", field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct YamlError {
    /// Path inside the document (`spec.ingress[0].ports[1]`), when known.
    pub field: Option<String>,
    /// The library's message, with line and column in the whole file.
    pub message: String,
}

impl YamlError {
    fn plain(message: String) -> Self {
        Self {
            field: None,
            message,
        }
    }
}

/// A problem found while splitting a stream, with the 1-based number of the
/// document it is in.
#[derive(Debug)]
pub struct StreamError {
    pub document: usize,
    pub kind: StreamErrorKind,
}

#[derive(Debug)]
pub enum StreamErrorKind {
    Syntax(YamlError),
    TooManyDocuments { limit: usize },
}

/// One document of a stream.
#[derive(Debug)]
pub struct Document<'a> {
    /// 1-based; empty documents are counted.
    pub number: usize,
    /// The document's text, from the end of the previous document.
    text: &'a str,
    /// Line (0-based) and column where `text` starts in the file.
    line: usize,
    column: usize,
    /// Empty, or only a null scalar.
    pub is_null: bool,
}

/// Splits `text` into its documents. A leading comment with no content is
/// not a document; `---` followed by nothing is an (empty) one.
pub fn documents(text: &str, max_documents: usize) -> Result<Vec<Document<'_>>, StreamError> {
    let mut out = Vec::new();
    // Where the current document's text starts: (byte, line, column).
    let mut start = (0, 0, 0);
    let mut depth = 0usize;
    // Root of the current document, once seen: `true` if a null scalar.
    let mut root_is_null: Option<bool> = None;
    let mut started = 0usize;
    for event in Parser::new_from_str(text) {
        // Inside a document, or before the next one.
        let document = if started > out.len() {
            started
        } else {
            started + 1
        };
        let (event, span) = event.map_err(|e| StreamError {
            document,
            kind: StreamErrorKind::Syntax(YamlError::plain(clip(&e.to_string()))),
        })?;
        match event {
            Event::DocumentStart(..) => {
                started += 1;
                if started > max_documents {
                    return Err(StreamError {
                        document: started,
                        kind: StreamErrorKind::TooManyDocuments {
                            limit: max_documents,
                        },
                    });
                }
                root_is_null = None;
            }
            Event::DocumentEnd => {
                let end = span.end;
                let end_byte = byte_offset(text, end.byte_offset(), end.index());
                out.push(Document {
                    number: started,
                    text: &text[start.0..end_byte],
                    line: start.1,
                    column: start.2,
                    is_null: root_is_null.unwrap_or(true),
                });
                start = (end_byte, end.line().saturating_sub(1), end.col());
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                root_is_null.get_or_insert(false);
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(StreamError {
                        document,
                        kind: StreamErrorKind::Syntax(YamlError::plain(format!(
                            "nesting deeper than {MAX_DEPTH} levels at line {}, column {}",
                            span.start.line(),
                            span.start.col() + 1
                        ))),
                    });
                }
            }
            Event::MappingEnd | Event::SequenceEnd => depth = depth.saturating_sub(1),
            Event::Scalar(value, style, _, tag) => {
                root_is_null.get_or_insert_with(|| {
                    tag.is_none()
                        && style == ScalarStyle::Plain
                        && matches!(value.as_ref(), "" | "~" | "null" | "Null" | "NULL")
                });
            }
            Event::Alias(_) => {
                root_is_null.get_or_insert(false);
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The byte offset of a parser marker (the parser counts characters; it
/// knows the byte offset for string input).
fn byte_offset(text: &str, byte: Option<usize>, chars: usize) -> usize {
    byte.unwrap_or_else(|| {
        text.char_indices()
            .nth(chars)
            .map_or(text.len(), |(i, _)| i)
    })
}

impl Document<'_> {
    /// Deserializes the document into `T`; errors carry the field path and
    /// the line and column in the whole file.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, YamlError> {
        // Pad the first line so columns match the file; lines are shifted
        // when the error is rendered.
        let padded;
        let text = if self.column == 0 {
            self.text
        } else {
            padded = format!("{}{}", " ".repeat(self.column), self.text);
            &padded
        };
        let mut path = None;
        let result = serde_saphyr::with_deserializer_from_str_with_options(
            text,
            options(),
            |deserializer| {
                serde_path_to_error::deserialize(deserializer).map_err(|e| {
                    path = Some(e.path().clone());
                    e.into_inner()
                })
            },
        );
        result.map_err(|e| {
            let mut render = RenderOptions::default();
            render.snippets = SnippetMode::Off;
            render.line_offset = self.line as u64;
            let message = e.render_with_options(render);
            YamlError {
                field: path.and_then(|p| field(&p, &message)).map(|f| clip(&f)),
                message: clip(&message),
            }
        })
    }
}

/// The path as `spec.ingress[0].ports[1]`; `None` at the root. An unknown
/// field is reported at the object that has it, not at the field itself.
fn field(path: &serde_path_to_error::Path, message: &str) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut segments: Vec<&Segment> = path.iter().collect();
    if let Some(Segment::Map { key }) = segments.last() {
        if message.starts_with(&format!("unknown field `{key}`")) {
            segments.pop();
        }
    }
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => out.push_str(if out.is_empty() { "?" } else { ".?" }),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Library messages quote the input (`invalid type: string "…"`, unknown
/// keys); keep their start and their end (the location), never megabytes.
fn clip(text: &str) -> String {
    const HEAD: usize = 200;
    const TAIL: usize = 120;
    let chars = text.chars().count();
    if chars <= HEAD + TAIL + 20 {
        return text.to_string();
    }
    let head: String = text.chars().take(HEAD).collect();
    let tail: String = text.chars().skip(chars - TAIL).collect();
    format!("{head} …({} bytes)… {tail}", text.len())
}

fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    // Outside aliases (limited below) every node and event takes at least a
    // byte of the file, so the file-size limit already bounds them; the
    // library's defaults (250,000 nodes) would refuse a legitimate policy
    // of 60,000 ipBlock rules.
    budget.max_nodes = super::MAX_FILE_BYTES;
    budget.max_events = 2 * super::MAX_FILE_BYTES;
    let mut aliases = serde_saphyr::options::AliasLimits::default();
    aliases.max_total_replayed_events = MAX_ALIAS_REPLAY;
    serde_saphyr::options! {
        budget: Some(budget),
        alias_limits: aliases,
        with_snippet: false,
        emit_comments: false,
    }
}

/// Deserializes a single-document file (the workloads file, a lab
/// topology). `Ok(None)` when it is empty or null.
pub fn single<T: DeserializeOwned>(text: &str) -> Result<Option<T>, YamlError> {
    let documents = documents(text, 1).map_err(|e| match e.kind {
        StreamErrorKind::Syntax(e) => e,
        StreamErrorKind::TooManyDocuments { .. } => {
            YamlError::plain("expected one YAML document, found more".to_string())
        }
    })?;
    match documents.first() {
        Some(document) if !document.is_null => document.deserialize().map(Some),
        _ => Ok(None),
    }
}
