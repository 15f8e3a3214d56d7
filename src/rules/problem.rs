//! Decides how a problem in the rules directory is reported: one [`RuleProblem`] per problem,
//! naming the file and the field (`models.toml: model[3].rate_usd: ...`), so that `creditgate
//! check`, the reload endpoint and the loader all list every problem at once.

use std::fmt;
use std::ops::Range;

/// One problem found while loading the rules directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleProblem {
    /// The file, relative to the rules directory (`models.toml`).
    pub file: String,
    /// The field, as a TOML path (`model[3].rate_usd`); `(file)` for the file as a whole.
    pub field: String,
    /// One human sentence; ends with the line number when it is known.
    pub message: String,
}

impl RuleProblem {
    pub fn new(
        file: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for RuleProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.field, self.message)
    }
}

impl std::error::Error for RuleProblem {}

/// The field name used for problems about a whole file.
pub(crate) const WHOLE_FILE: &str = "(file)";

/// One rules file being checked: its name and text, to turn byte offsets into line numbers.
#[derive(Clone, Copy)]
pub(crate) struct FileCtx<'s> {
    pub name: &'static str,
    pub src: &'s str,
}

impl FileCtx<'_> {
    /// 1-based line of a byte offset.
    pub fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.src.len());
        self.src.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// A problem at `field`, with the line of `span` appended to the message when known.
    pub fn problem(
        &self,
        field: impl Into<String>,
        message: impl fmt::Display,
        span: Option<&Range<usize>>,
    ) -> RuleProblem {
        let message = match span {
            Some(s) => format!("{message} (line {})", self.line(s.start)),
            None => message.to_string(),
        };
        RuleProblem::new(self.name, field, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_and_field() {
        let p = RuleProblem::new("models.toml", "model[3].rate_usd", "-0.054 is negative");
        assert_eq!(
            p.to_string(),
            "models.toml: model[3].rate_usd: -0.054 is negative"
        );
    }

    #[test]
    fn lines_are_one_based() {
        let ctx = FileCtx {
            name: "x.toml",
            src: "a = 1\nb = 2\nc = 3\n",
        };
        assert_eq!(ctx.line(0), 1);
        assert_eq!(ctx.line(6), 2);
        assert_eq!(ctx.line(12), 3);
        assert_eq!(ctx.line(999), 4);
        let p = ctx.problem("b", "bad", Some(&(6..7)));
        assert_eq!(p.message, "bad (line 2)");
    }
}
