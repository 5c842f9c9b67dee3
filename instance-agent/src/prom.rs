//! A small, tolerant parser of the Prometheus text exposition format.
//!
//! Only what the agent needs: sample lines become [`Sample`]s; comments
//! (`# HELP`, `# TYPE`, anything else after `#`), blank lines and lines that do
//! not parse are skipped, so one odd line from an engine never hides the rest.

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample of `text` that parses, in order.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// Sum of the finite values of every sample named `name` (all label sets);
/// `None` when no sample has that name.
pub fn sum(samples: &[Sample], name: &str) -> Option<f64> {
    let mut found = false;
    let mut total = 0.0;
    for s in samples.iter().filter(|s| s.name == name) {
        found = true;
        if s.value.is_finite() {
            total += s.value;
        }
    }
    found.then_some(total)
}

/// Mean of the finite values of every sample named `name`; `None` when there is none.
pub fn mean(samples: &[Sample], name: &str) -> Option<f64> {
    let vals: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name && s.value.is_finite())
        .map(|s| s.value)
        .collect();
    (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
}

/// Parse one line; `None` for comments, blank lines and anything malformed.
pub fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (mut name, rest) = match line.find(|c: char| c == '{' || c.is_whitespace()) {
        Some(i) => (line[..i].to_string(), line[i..].trim_start()),
        None => return None, // a name with no value
    };
    let mut labels = Vec::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let block = parse_labels(body)?;
        labels = block.labels;
        if let Some(q) = block.quoted_name {
            // UTF-8 style `{"metric.name", l="v"}`: the name lives inside the braces
            if !name.is_empty() {
                return None;
            }
            name = q;
        }
        block.rest
    } else {
        rest
    };
    if name.is_empty() {
        return None;
    }
    // value, then an optional timestamp we do not need
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// A sample value: decimal or exponent form, `NaN`, `+Inf`, `-Inf`.
pub fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        _ => s.parse::<f64>().ok(),
    }
}

/// The parsed inside of `{...}`.
struct LabelBlock<'a> {
    labels: Vec<(String, String)>,
    /// A quoted metric name that appeared without `=` (UTF-8 style names).
    quoted_name: Option<String>,
    /// What follows the `}`.
    rest: &'a str,
}

/// Parse the inside of `{...}` (after the `{`).
fn parse_labels(body: &str) -> Option<LabelBlock<'_>> {
    let mut labels = Vec::new();
    let mut quoted_name = None;
    let mut rest = body;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Some(LabelBlock {
                labels,
                quoted_name,
                rest: after,
            });
        }
        let key = if rest.starts_with('"') {
            let (s, after) = parse_quoted(rest)?;
            rest = after.trim_start();
            if !rest.starts_with('=') {
                // a bare quoted string is the metric name
                if quoted_name.is_some() {
                    return None;
                }
                quoted_name = Some(s);
                rest = skip_comma(rest)?;
                continue;
            }
            s
        } else {
            let end = rest.find(|c: char| c == '=' || c.is_whitespace())?;
            let k = rest[..end].to_string();
            rest = rest[end..].trim_start();
            k
        };
        rest = rest.strip_prefix('=')?.trim_start();
        let (value, after) = parse_quoted(rest)?;
        if key.is_empty() {
            return None;
        }
        labels.push((key, value));
        rest = skip_comma(after)?;
    }
}

/// After a label: `,` (possibly trailing before `}`) or `}`.
fn skip_comma(rest: &str) -> Option<&str> {
    let rest = rest.trim_start();
    if let Some(after) = rest.strip_prefix(',') {
        Some(after)
    } else if rest.starts_with('}') {
        Some(rest)
    } else {
        None
    }
}

/// A `"..."` string with `\\`, `\"` and `\n` escapes; returns it and what follows.
fn parse_quoted(s: &str) -> Option<(String, &str)> {
    let body = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &body[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                // `\\`, `\"`, and (tolerantly) any other escaped char as itself
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None // unterminated
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_labelled_samples() {
        let text = "# HELP vllm:num_requests_running Number of requests.\n\
                    # TYPE vllm:num_requests_running gauge\n\
                    vllm:num_requests_running{model_name=\"a\"} 3\n\
                    vllm:num_requests_running{model_name=\"b\",engine=\"1\"} 4.5\n\
                    \n\
                    up 1\n";
        let s = parse(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "vllm:num_requests_running");
        assert_eq!(s[0].label("model_name"), Some("a"));
        assert_eq!(s[1].labels.len(), 2);
        assert_eq!(s[1].label("engine"), Some("1"));
        assert_eq!(s[2].name, "up");
        assert!(s[2].labels.is_empty());
        assert_eq!(sum(&s, "vllm:num_requests_running"), Some(7.5));
        assert_eq!(sum(&s, "missing"), None);
    }

    #[test]
    fn escaped_quotes_braces_and_commas_in_label_values() {
        let line = r#"m{a="say \"hi\", {ok}",b="back\\slash",c="line\nbreak",} 2 1700000000000"#;
        let s = parse_line(line).expect("parses");
        assert_eq!(s.name, "m");
        assert_eq!(s.label("a"), Some(r#"say "hi", {ok}"#));
        assert_eq!(s.label("b"), Some(r"back\slash"));
        assert_eq!(s.label("c"), Some("line\nbreak"));
        assert_eq!(s.value, 2.0);
    }

    #[test]
    fn special_and_exponent_values() {
        assert_eq!(parse_line("x 1e3").unwrap().value, 1000.0);
        assert_eq!(parse_line("x -2.5E-1").unwrap().value, -0.25);
        assert_eq!(parse_line("x +Inf").unwrap().value, f64::INFINITY);
        assert_eq!(parse_line("x -Inf").unwrap().value, f64::NEG_INFINITY);
        assert!(parse_line("x NaN").unwrap().value.is_nan());
        assert_eq!(
            parse_line(r#"h_bucket{le="+Inf"} 12"#).unwrap().label("le"),
            Some("+Inf")
        );
        // non-finite values do not poison sums
        let s = parse("x NaN\nx 2\nx +Inf\n");
        assert_eq!(sum(&s, "x"), Some(2.0));
        assert_eq!(mean(&s, "x"), Some(2.0));
    }

    #[test]
    fn malformed_lines_are_skipped_not_fatal() {
        let text = "good 1\n\
                    novalue\n\
                    bad{a=\"unterminated} 1\n\
                    bad{a=unquoted} 1\n\
                    bad{a=\"x\" b=\"y\"} 1\n\
                    bad 1x\n\
                    {} 3\n\
                    # a comment 5\n\
                    also_good{} 2\n";
        let s = parse(text);
        let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["good", "also_good"]);
    }

    #[test]
    fn quoted_metric_name_inside_braces() {
        let s = parse_line(r#"{"my.metric", l="v"} 4"#).unwrap();
        assert_eq!(s.name, "my.metric");
        assert_eq!(s.label("l"), Some("v"));
        assert_eq!(s.value, 4.0);
    }

    #[test]
    fn whitespace_tolerance() {
        let s = parse_line("  m { a = \"1\" , b=\"2\" }   7   \r").unwrap();
        assert_eq!(s.name, "m");
        assert_eq!(
            s.labels,
            [("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(s.value, 7.0);
    }
}
