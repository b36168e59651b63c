//! The Markdown the checks read: documents, their fenced blocks, prose and inline
//! code.

use regex::Regex;

/// One Markdown file, by its path from the repository root.
pub struct Doc {
    pub path: String,
    pub text: String,
}

impl Doc {
    pub fn new(path: &str, text: &str) -> Self {
        Doc {
            path: path.into(),
            text: text.into(),
        }
    }

    /// The fenced blocks: info string, body and the line of the opening fence.
    pub fn blocks(&self) -> Vec<Block> {
        let mut blocks = Vec::new();
        let mut open: Option<Block> = None;
        for (index, line) in self.text.lines().enumerate() {
            let fence = line.trim_start().strip_prefix("```");
            match (&mut open, fence) {
                (None, Some(info)) => {
                    open = Some(Block {
                        info: info.trim().to_owned(),
                        body: String::new(),
                        line: index + 1,
                    })
                }
                (Some(_), Some(_)) => blocks.extend(open.take()),
                (Some(block), None) => {
                    block.body.push_str(line.trim_start());
                    block.body.push('\n');
                }
                (None, None) => {}
            }
        }
        blocks
    }

    /// Every line outside fenced blocks, numbered from 1.
    pub fn prose(&self) -> Vec<(usize, &str)> {
        let mut inside = false;
        let mut lines = Vec::new();
        for (index, line) in self.text.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                inside = !inside;
            } else if !inside {
                lines.push((index + 1, line));
            }
        }
        lines
    }

    /// Inline code spans of the prose (a run of backticks up to the next equal run).
    pub fn inline_code(&self) -> Vec<(usize, String)> {
        let span = Regex::new(r"(`+)([^`]|[^`].*?[^`])(`+)").unwrap();
        let mut spans = Vec::new();
        for (line, text) in self.prose() {
            for found in span.captures_iter(text) {
                if found[1].len() == found[3].len() {
                    spans.push((line, found[2].trim().to_owned()));
                }
            }
        }
        spans
    }

    pub fn at(&self, line: usize) -> String {
        format!("{}:{line}", self.path)
    }
}

pub struct Block {
    pub info: String,
    pub body: String,
    pub line: usize,
}

impl Block {
    pub fn language(&self) -> &str {
        self.info.split([' ', ',']).next().unwrap_or_default()
    }

    pub fn marked(&self, mark: &str) -> bool {
        self.info.split([' ', ',']).skip(1).any(|word| word == mark)
    }
}

/// A document of one file, for the tests that feed a check a wrong document.
pub fn one_doc(text: &str) -> Vec<Doc> {
    vec![Doc::new("docs/wrong.md", text)]
}
