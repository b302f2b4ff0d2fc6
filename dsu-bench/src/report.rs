//! Output: aligned text tables on stdout, JSON files in the output directory.

use std::path::Path;

use serde_json::Value;

/// A table printed with aligned columns.
#[derive(Debug, Clone)]
pub struct Table {
    title: String,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, headers: &[&str]) -> Table {
        Table {
            title: title.to_string(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text: title, header, rule, rows; numbers right-aligned.
    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut width: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .take(cols)
                .map(|(i, c)| {
                    let numeric =
                        c.starts_with(|ch: char| ch.is_ascii_digit() || ch == '-') && i > 0;
                    if numeric {
                        format!("{c:>w$}", w = width[i])
                    } else {
                        format!("{c:<w$}", w = width[i])
                    }
                })
                .collect();
            parts.join("  ").trim_end().to_string()
        };
        let mut out = format!("\n## {}\n\n", self.title);
        out.push_str(&line(&self.headers));
        out.push('\n');
        let total: usize = width.iter().sum::<usize>() + 2 * cols.saturating_sub(1);
        out.push_str(&"-".repeat(total));
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// Writes `value` as pretty JSON to `<dir>/<name>.json`.
pub fn write_json(dir: &Path, name: &str, value: &Value) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(dir.join(format!("{name}.json")), text + "\n")
}

/// A number with `digits` decimals.
pub fn num(v: f64, digits: usize) -> String {
    format!("{v:.digits$}")
}

/// A ratio as `1.23x`.
pub fn ratio(v: f64) -> String {
    format!("{v:.2}x")
}
