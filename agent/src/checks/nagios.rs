//! Nagios plugin output: the first line is the status text, optionally followed by
//! `| perfdata`; later lines are long output, and from the first later line containing
//! `|` onwards everything after the bar is perfdata too.
//!
//! Perfdata: space-separated `'label'=value[UOM];[warn];[crit];[min];[max]`, labels quoted
//! with single quotes when they contain spaces (`''` is a literal quote). A value of `U`
//! (undetermined) yields no metric.

use outpost_protocol::Metric;

/// A plugin's output, split into its parts.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub output: String,
    pub long_output: String,
    pub metrics: Vec<Metric>,
    /// Perfdata items that could not be parsed, as written.
    pub bad_perfdata: Vec<String>,
}

pub fn parse_output(text: &str) -> Parsed {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let (output, mut perf) = match first.split_once('|') {
        Some((o, p)) => (o.trim().to_string(), p.trim().to_string()),
        None => (first.trim().to_string(), String::new()),
    };
    let mut long = Vec::new();
    let mut in_perf = false;
    for line in lines {
        if in_perf {
            perf.push(' ');
            perf.push_str(line.trim());
        } else if let Some((l, p)) = line.split_once('|') {
            if !l.trim().is_empty() {
                long.push(l.trim_end());
            }
            perf.push(' ');
            perf.push_str(p.trim());
            in_perf = true;
        } else {
            long.push(line.trim_end());
        }
    }
    let (metrics, bad_perfdata) = parse_perfdata(&perf);
    Parsed {
        output,
        long_output: long.join("\n").trim_end().to_string(),
        metrics,
        bad_perfdata,
    }
}

/// Split perfdata into items, honouring single-quoted labels.
fn split_items(perf: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = perf.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' if quoted && chars.peek() == Some(&'\'') => {
                cur.push('\'');
                cur.push('\'');
                chars.next();
            }
            '\'' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    items.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        items.push(cur);
    }
    items
}

pub fn parse_perfdata(perf: &str) -> (Vec<Metric>, Vec<String>) {
    let mut metrics = Vec::new();
    let mut bad = Vec::new();
    for item in split_items(perf) {
        match parse_item(&item) {
            Ok(Some(m)) => metrics.push(m),
            Ok(None) => {}
            Err(()) => bad.push(item),
        }
    }
    (metrics, bad)
}

fn parse_item(item: &str) -> Result<Option<Metric>, ()> {
    let (label, rest) = if let Some(q) = item.strip_prefix('\'') {
        // Find the closing quote that is not a doubled one.
        let bytes = q.as_bytes();
        let mut i = 0;
        let mut label = String::new();
        loop {
            match bytes.get(i) {
                None => return Err(()),
                Some(b'\'') if bytes.get(i + 1) == Some(&b'\'') => {
                    label.push('\'');
                    i += 2;
                }
                Some(b'\'') => break,
                Some(_) => {
                    let ch = q[i..].chars().next().ok_or(())?;
                    label.push(ch);
                    i += ch.len_utf8();
                }
            }
        }
        let rest = q[i + 1..].strip_prefix('=').ok_or(())?;
        (label, rest)
    } else {
        let (l, r) = item.split_once('=').ok_or(())?;
        (l.to_string(), r)
    };
    if label.is_empty() {
        return Err(());
    }
    let mut fields = rest.split(';');
    let value_uom = fields.next().unwrap_or("");
    if value_uom == "U" {
        return Ok(None);
    }
    let split = value_uom
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(value_uom.len());
    // An exponent marker must not swallow a unit such as "EB": retry without it.
    let (mut num, mut unit) = value_uom.split_at(split);
    if num.parse::<f64>().is_err() {
        let alt = value_uom
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+')))
            .unwrap_or(value_uom.len());
        (num, unit) = value_uom.split_at(alt);
    }
    let value: f64 = num.parse().map_err(|_| ())?;
    if !value.is_finite() {
        return Err(());
    }
    let opt = |s: Option<&str>| {
        s.map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let warn = opt(fields.next());
    let crit = opt(fields.next());
    let num_opt = |s: Option<&str>| -> Result<Option<f64>, ()> {
        match s.map(str::trim).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or(()),
        }
    };
    let min = num_opt(fields.next())?;
    let max = num_opt(fields.next())?;
    Ok(Some(Metric {
        name: label,
        value,
        unit: (!unit.is_empty()).then(|| unit.to_string()),
        warn,
        crit,
        min,
        max,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_load_style_output() {
        let p = parse_output("LOAD OK - total load average: 0.10, 0.20, 0.30|load1=0.100;5.000;10.000;0; load5=0.200;4.000;8.000;0; load15=0.300;3.000;6.000;0; \n");
        assert_eq!(p.output, "LOAD OK - total load average: 0.10, 0.20, 0.30");
        assert_eq!(p.metrics.len(), 3);
        assert_eq!(p.metrics[0].name, "load1");
        assert_eq!(p.metrics[0].value, 0.1);
        assert_eq!(p.metrics[0].warn.as_deref(), Some("5.000"));
        assert_eq!(p.metrics[0].min, Some(0.0));
        assert_eq!(p.metrics[0].max, None);
        assert!(p.bad_perfdata.is_empty());
    }

    #[test]
    fn quoted_labels_units_ranges_and_long_output() {
        let p = parse_output(
            "DISK OK | '/ free'=1024MB;@10:20;~:5;0;2048 'it''s'=5%\nline two\nline three | time=0.5s;;;0\nsize=12B;;;0\n",
        );
        assert_eq!(p.output, "DISK OK");
        assert_eq!(p.long_output, "line two\nline three");
        let names: Vec<_> = p.metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, vec!["/ free", "it's", "time", "size"]);
        assert_eq!(p.metrics[0].unit.as_deref(), Some("MB"));
        assert_eq!(p.metrics[0].warn.as_deref(), Some("@10:20"));
        assert_eq!(p.metrics[0].crit.as_deref(), Some("~:5"));
        assert_eq!(p.metrics[0].max, Some(2048.0));
        assert_eq!(p.metrics[1].unit.as_deref(), Some("%"));
        assert_eq!(p.metrics[2].unit.as_deref(), Some("s"));
    }

    #[test]
    fn undetermined_and_garbage_perfdata() {
        let p = parse_output("x | a=U;1;2 b=abc c= =5 d=1e3 'open=1");
        let names: Vec<_> = p
            .metrics
            .iter()
            .map(|m| (m.name.as_str(), m.value))
            .collect();
        assert_eq!(names, vec![("d", 1000.0)]);
        assert_eq!(p.bad_perfdata.len(), 4, "{:?}", p.bad_perfdata);
        let e = parse_perfdata("e=2.5EB").0;
        assert_eq!((e[0].value, e[0].unit.as_deref()), (2.5, Some("EB")));
    }

    #[test]
    fn empty_output() {
        assert_eq!(parse_output(""), Parsed::default());
    }
}
