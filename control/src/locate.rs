//! Finds the line of a field in a YAML document, so that an error found
//! after parsing (across resources) points at the field, not at the start of
//! its resource. Block style is followed key by key and item by item; inside
//! a flow collection (`{...}`, `[...]`) the line that opens it is the answer.

use std::collections::HashMap;

use crate::error::ConfigError;

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Seg::Key(key));
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            if let Ok(n) = idx.trim_end_matches(']').parse() {
                out.push(Seg::Index(n));
            }
        }
    }
    out
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start_matches(' ').len()
}

fn skip(l: &str) -> bool {
    let t = l.trim();
    t.is_empty() || t.starts_with('#')
}

/// The column where a line's content starts after its `- ` markers.
fn content_col(l: &str) -> usize {
    let mut c = indent(l);
    while l[c..].starts_with("- ") {
        c += 2;
        c += indent(&l[c..]);
    }
    c
}

fn is_key(content: &str, key: &str) -> bool {
    let c = content.trim_start_matches(['"', '\'']);
    c.strip_prefix(key)
        .map(|r| r.trim_start_matches(['"', '\'']))
        .is_some_and(|r| r.trim_start().starts_with(':'))
}

/// The 1-based line of `path` in the document that starts at `first_line`
/// of `text`; the deepest line found when the path leaves block style.
pub fn locate(text: &str, first_line: u32, path: &str) -> Option<u32> {
    let lines: Vec<&str> = text
        .lines()
        .skip(first_line.saturating_sub(1) as usize)
        .take_while(|l| l.trim_end() != "---")
        .collect();
    // Where the previous segment was found: line, and the column of its
    // content; and whether it was a list item (its keys start on its line).
    let mut at: Option<(usize, usize)> = None;
    let mut item = false;
    let mut found = None;
    for seg in segments(path) {
        match seg {
            Seg::Key(k) => {
                let (from, min_col, same_line) = match at {
                    None => (0, 0, false),
                    Some((j, c)) if item => (j, c, true),
                    Some((j, c)) => (j + 1, c + 1, false),
                };
                let mut hit = None;
                for (j, l) in lines.iter().enumerate().skip(from) {
                    if skip(l) {
                        continue;
                    }
                    let col = content_col(l);
                    let first = same_line && j == from;
                    if !first && indent(l) < min_col {
                        break;
                    }
                    if (first || col >= min_col) && is_key(&l[col..], k) {
                        hit = Some((j, col));
                        break;
                    }
                }
                at = Some(hit?);
                item = false;
            }
            Seg::Index(n) => {
                let (j0, c) = at?;
                let rest = lines[j0][c..].split_once(':').map_or("", |(_, v)| v.trim());
                if rest.starts_with('[') {
                    break;
                }
                let mut seen = 0;
                let mut dash_col = None;
                let mut hit = None;
                for (j, l) in lines.iter().enumerate().skip(j0 + 1) {
                    if skip(l) {
                        continue;
                    }
                    let ind = indent(l);
                    let is_dash = l[ind..].starts_with("- ") || l[ind..].trim_end() == "-";
                    match dash_col {
                        None if is_dash && ind >= c => dash_col = Some(ind),
                        None => break,
                        Some(d) if ind < d || (ind == d && !is_dash) => break,
                        Some(_) => {}
                    }
                    if is_dash && Some(ind) == dash_col {
                        if seen == n {
                            hit = Some((j, ind + 2));
                            break;
                        }
                        seen += 1;
                    }
                }
                at = Some(hit?);
                item = true;
            }
        }
        found = at.map(|(j, _)| j);
    }
    found.map(|j| first_line + j as u32)
}

/// Moves errors that point at the start of their resource (column 1, as
/// cross-resource checks report them) to the line of their field, reading
/// each file once.
pub fn refine_lines(errors: &mut [ConfigError]) {
    let mut files: HashMap<String, Option<String>> = HashMap::new();
    for e in errors.iter_mut() {
        if e.column != 1 || e.field.is_empty() || e.line == 0 {
            continue;
        }
        let text = files
            .entry(e.file.clone())
            .or_insert_with(|| std::fs::read_to_string(&e.file).ok());
        if let Some(t) = text
            && let Some(l) = locate(t, e.line, &e.field)
        {
            e.line = l;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"# a comment
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: ns}
spec:
  hosts: [r]
  http:
  - match:
    - uri: {prefix: /a}
    route:
    - destination: {host: a}
  - route:
    - destination:
        host: b
        subset: v2
      weight: 100
    mirror: {host: m}
"#;

    #[test]
    fn finds_fields_in_block_and_flow_style() {
        assert_eq!(locate(DOC, 1, "spec.hosts"), Some(6));
        assert_eq!(
            locate(DOC, 1, "spec.http[0].route[0].destination"),
            Some(11)
        );
        assert_eq!(
            locate(DOC, 1, "spec.http[1].route[0].destination"),
            Some(13)
        );
        assert_eq!(
            locate(DOC, 1, "spec.http[1].route[0].destination.subset"),
            Some(15)
        );
        assert_eq!(locate(DOC, 1, "spec.http[1].mirror"), Some(17));
        assert_eq!(locate(DOC, 1, "spec.http[0].match[0].uri"), Some(9));
        assert_eq!(locate(DOC, 1, "spec.http[2]"), None);
        assert_eq!(locate(DOC, 1, "spec.tcp"), None);
    }

    #[test]
    fn a_later_document_is_searched_from_its_first_line() {
        let two = format!("{DOC}---\n{DOC}");
        assert_eq!(
            locate(&two, 19, "spec.http[1].route[0].destination"),
            Some(31)
        );
    }
}
