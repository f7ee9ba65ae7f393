//! Turning samples into percentiles, a summary table, one JSON line and an
//! SVG histogram.

use std::fmt::Write as _;

/// p50 / p99 / max of a sample set, in its unit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(samples: &mut [f64]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            count: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        }
    }

    pub fn json(&self) -> String {
        format!(
            "{{\"count\":{},\"p50\":{:.3},\"p99\":{:.3},\"max\":{:.3}}}",
            self.count, self.p50, self.p99, self.max
        )
    }
}

/// A JSON object built field by field (numbers, strings, raw JSON).
#[derive(Default)]
pub struct Json(String);

impl Json {
    pub fn num(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Json {
        self.sep();
        let _ = write!(self.0, "\"{key}\":{value}");
        self
    }
    pub fn float(&mut self, key: &str, value: f64) -> &mut Json {
        if value.is_finite() {
            self.num(key, format!("{value:.4}"))
        } else {
            self.num(key, "null")
        }
    }
    pub fn str(&mut self, key: &str, value: &str) -> &mut Json {
        self.sep();
        let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = write!(self.0, "\"{key}\":\"{escaped}\"");
        self
    }
    pub fn raw(&mut self, key: &str, json: &str) -> &mut Json {
        self.num(key, json)
    }
    fn sep(&mut self) {
        if !self.0.is_empty() {
            self.0.push(',');
        }
    }
    pub fn finish(&self) -> String {
        format!("{{{}}}", self.0)
    }
}

const W: f64 = 480.0;
const H: f64 = 300.0;
const BINS: usize = 40;

/// An SVG with one histogram per (title, unit, samples), side by side.
pub fn histogram_svg(panels: &[(&str, &str, &[f64])]) -> String {
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        W * panels.len() as f64,
        H
    );
    for (p, &(title, unit, samples)) in panels.iter().enumerate() {
        write_panel(&mut svg, p as f64 * W + 50.0, title, unit, samples);
    }
    svg.push_str("</svg>\n");
    svg
}

/// Samples counted into `BINS` equal bins from `lo` to `hi`.
struct Histogram {
    lo: f64,
    hi: f64,
    /// Samples above `hi`, counted in the last bin.
    tail: usize,
    max: f64,
    counts: [usize; BINS],
    top: f64,
}

impl Histogram {
    fn of(samples: &[f64]) -> Histogram {
        // The axis ends at the 99.5th percentile, so one slow outlier does
        // not squash the rest into a single bar; the last bar holds the tail.
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let lo = sorted[0].min(0.0);
        let hi = sorted[((sorted.len() - 1) as f64 * 0.995) as usize].max(lo + 1e-9);
        let tail = sorted.iter().filter(|&&v| v > hi).count();
        let width = ((hi - lo) / BINS as f64).max(1e-9);
        let mut counts = [0usize; BINS];
        for &s in samples.iter() {
            counts[(((s - lo) / width) as usize).min(BINS - 1)] += 1;
        }
        let top = *counts.iter().max().unwrap_or(&1) as f64;
        Histogram {
            lo,
            hi,
            tail,
            max: sorted[sorted.len() - 1],
            counts,
            top,
        }
    }
}

/// One histogram, its plot area starting `x0` from the left.
fn write_panel(svg: &mut String, x0: f64, title: &str, unit: &str, samples: &[f64]) {
    let (plot_w, plot_h, y0) = (W - 80.0, H - 90.0, 40.0);
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"22\" font-size=\"14\">{title} (n = {})</text>",
        x0,
        samples.len()
    );
    if samples.is_empty() {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\">no samples</text>",
            x0,
            y0 + 40.0
        );
        return;
    }
    let hist = Histogram::of(samples);
    for (i, &c) in hist.counts.iter().enumerate() {
        let h = plot_h * c as f64 / hist.top;
        let _ = writeln!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#4477aa\"/>",
            x0 + i as f64 * plot_w / BINS as f64,
            y0 + plot_h - h,
            plot_w / BINS as f64 - 1.0,
            h
        );
    }
    write_axis(svg, x0, y0 + plot_h, plot_w, unit, &hist);
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
        x0 - 4.0,
        y0 + 10.0,
        hist.top as usize
    );
}

/// The x axis at `axis_y`: its line, five ticks, and the unit (with a note
/// on the tail, if the last bar holds one).
fn write_axis(svg: &mut String, x0: f64, axis_y: f64, plot_w: f64, unit: &str, hist: &Histogram) {
    let (lo, hi, tail) = (hist.lo, hist.hi, hist.tail);
    let _ = writeln!(
        svg,
        "<line x1=\"{x0}\" y1=\"{axis_y}\" x2=\"{}\" y2=\"{axis_y}\" stroke=\"black\"/>",
        x0 + plot_w
    );
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{v:.1}</text>",
            x0 + plot_w * k as f64 / 4.0,
            axis_y + 16.0
        );
    }
    let tail_note = if tail > 0 {
        format!(
            " (last bar also holds {tail} above {hi:.1}; max {:.1})",
            hist.max
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{unit}{tail_note}</text>",
        x0 + plot_w / 2.0,
        axis_y + 34.0
    );
}
