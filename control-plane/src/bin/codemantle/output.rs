//! Rendering: aligned tables for people, JSON for scripts, and human times.

use serde_json::Value;

pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints `value` as pretty JSON.
    pub fn print_json(&self, value: &Value) {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
        );
    }
}

/// An aligned, space-separated table with a header row.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                out.push_str(&" ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// A string field, or `-`.
pub fn text(v: &Value) -> String {
    match v {
        Value::String(s) if !s.is_empty() => s.clone(),
        Value::Null => "-".into(),
        Value::String(_) => "-".into(),
        other => other.to_string(),
    }
}

/// `12s ago`, `5m ago`, `3h ago`, `2d ago` for a ms timestamp, `-` for null.
pub fn ago(v: &Value) -> String {
    let Some(ms) = v.as_u64() else {
        return "-".into();
    };
    let now = codemantle_control_plane::time::now_ms();
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// RFC 3339 UTC for a ms timestamp, `-` for null.
pub fn when(v: &Value) -> String {
    v.as_u64()
        .map(codemantle_control_plane::time::format_rfc3339)
        .unwrap_or_else(|| "-".into())
}

/// `k=v,k2=v2` for a labels object.
pub fn labels(v: &Value) -> String {
    match v.as_object() {
        Some(map) if !map.is_empty() => map
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}
