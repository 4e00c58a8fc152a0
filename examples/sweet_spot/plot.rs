//! The accuracy-vs-b plot, written as hand-made SVG (no plotting dependency):
//! log2(b) on x, accuracy on y, one polyline per series with +/- 1 std bars.

use std::fmt::Write as _;

/// One line of the plot: `(b, mean, std)` points.
pub struct Series {
    pub label: String,
    /// Index into the palette; lines of the same p share a colour.
    pub color: usize,
    pub dashed: bool,
    pub points: Vec<(usize, f64, f64)>,
}

/// Which lower corner holds the legend.
#[derive(Clone, Copy)]
pub enum LegendAt {
    LowerLeft,
    LowerRight,
}

const PALETTE: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];
const W: f64 = 900.0;
const H: f64 = 560.0;
const LEFT: f64 = 75.0;
const RIGHT: f64 = 25.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `n` ticks.
fn nice_step(range: f64, n: f64) -> f64 {
    let raw = (range / n).max(1e-12);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    mag * if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    }
}

/// Renders the plot as an SVG document.
pub fn render(
    title: &str,
    y_desc: &str,
    legend_at: LegendAt,
    series: &[Series],
) -> Result<String, String> {
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| (p.0 as f64).log2()))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().flat_map(|p| [p.1 - p.2, p.1 + p.2]))
        .filter(|v| v.is_finite())
        .collect();
    if xs.is_empty() || ys.is_empty() {
        return Err("nothing to plot".into());
    }
    let (x0, x1) = xs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, &x| {
        (a.0.min(x), a.1.max(x))
    });
    let (y0, y1) = ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, &y| {
        (a.0.min(y), a.1.max(y))
    });
    let pad = ((y1 - y0) * 0.08).max(0.005);
    let step = nice_step(y1 - y0 + 2.0 * pad, 8.0);
    let y0 = (((y0 - pad) / step).floor() * step).max(0.0);
    let y1 = (((y1 + pad) / step).ceil() * step).min(1.0).max(y0 + step);
    let (x0, x1) = (x0 - 0.3, x1 + 0.3);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + (y1 - y) / (y1 - y0) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="30" font-size="20" text-anchor="middle">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    // Grid and ticks.
    let mut y = y0;
    while y <= y1 + step * 1e-6 {
        let py = sy(y);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e6e6e6"/><text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end">{y:.2}</text>"##,
            LEFT + pw,
            LEFT - 8.0,
            py + 4.0
        );
        y += step;
    }
    let mut e = x0.ceil() as i32;
    while (e as f64) <= x1 {
        let px = sx(e as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#e6e6e6"/><text x="{px:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 18.0,
            1u64 << e.max(0)
        );
        e += 1;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle">micro-batch size b (log scale)</text>"#,
        LEFT + pw / 2.0,
        H - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20,{:.1}) rotate(-90)" font-size="13" text-anchor="middle">{}</text>"#,
        TOP + ph / 2.0,
        esc(y_desc)
    );
    // Series.
    for ser in series {
        let c = PALETTE[ser.color % PALETTE.len()];
        let dash = if ser.dashed {
            r#" stroke-dasharray="8,5""#
        } else {
            ""
        };
        let pts: Vec<String> = ser
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|p| format!("{:.1},{:.1}", sx((p.0 as f64).log2()), sy(p.1)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"{dash}/>"#,
            pts.join(" ")
        );
        for p in ser.points.iter().filter(|p| p.1.is_finite()) {
            let (px, py) = (sx((p.0 as f64).log2()), sy(p.1));
            if p.2.is_finite() && p.2 > 0.0 {
                let _ = writeln!(
                    s,
                    r#"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="{c}" stroke-opacity="0.6"/>"#,
                    sy((p.1 + p.2).min(y1)),
                    sy((p.1 - p.2).max(y0))
                );
            }
            let fill = if ser.dashed { "white" } else { c };
            let _ = writeln!(
                s,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{fill}" stroke="{c}" stroke-width="1.5"/>"#
            );
        }
    }
    // Legend.
    let longest = series
        .iter()
        .map(|s| s.label.chars().count())
        .max()
        .unwrap_or(0);
    let (lw, lh) = (
        62.0 + 7.0 * longest as f64,
        10.0 + 20.0 * series.len() as f64,
    );
    let lx = match legend_at {
        LegendAt::LowerLeft => LEFT + 12.0,
        LegendAt::LowerRight => LEFT + pw - lw - 12.0,
    };
    let ly = TOP + ph - lh - 12.0;
    let _ = writeln!(
        s,
        r#"<rect x="{lx:.1}" y="{ly:.1}" width="{lw}" height="{lh}" fill="white" fill-opacity="0.9" stroke="black"/>"#
    );
    for (i, ser) in series.iter().enumerate() {
        let c = PALETTE[ser.color % PALETTE.len()];
        let dash = if ser.dashed {
            r#" stroke-dasharray="8,5""#
        } else {
            ""
        };
        let yy = ly + 15.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{c}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
            lx + 10.0,
            lx + 40.0,
            lx + 48.0,
            yy + 4.0,
            esc(&ser.label)
        );
    }
    s.push_str("</svg>\n");
    Ok(s)
}

/// Renders and writes the plot.
pub fn draw(
    path: &str,
    title: &str,
    y_desc: &str,
    legend_at: LegendAt,
    series: &[Series],
) -> Result<(), String> {
    let svg = render(title, y_desc, legend_at, series)?;
    std::fs::write(path, svg).map_err(|e| e.to_string())
}
