//! SVG plots for the benchmark pages, written by hand (no plotting dependency).

#![allow(clippy::cast_precision_loss, reason = "plot coordinates are floats")]

use std::fmt::Write as _;

/// Series colours, in order.
const COLORS: [&str; 6] = [
    "#222222", "#1f77b4", "#17becf", "#2ca02c", "#d62728", "#9467bd",
];

/// Line chart: one polyline per series of (x, y) points, linear axes from zero.
#[must_use]
pub fn svg_lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let (w, h, left, top, pw, ph) = (760.0, 420.0, 70.0, 40.0, 470.0, 320.0);
    let xmax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(0.0, f64::max)
        .max(1e-9);
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1e-9);
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n"
    );
    let _ = writeln!(
        out,
        "<text x='10' y='20' font-size='14' font-weight='bold'>{title}</text>"
    );
    let _ = writeln!(
        out,
        "<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' stroke='#999'/>"
    );
    let _ = writeln!(
        out,
        "<text x='{}' y='{}'>{x_label} (0 to {xmax:.0})</text>",
        left,
        top + ph + 30.0
    );
    let _ = writeln!(
        out,
        "<text x='10' y='{}'>{y_label}</text><text x='10' y='{}'>0 to {ymax:.0}</text>",
        top + 10.0,
        top + 26.0
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = pts
            .iter()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    left + x / xmax * pw,
                    top + ph - y / ymax * ph
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill='none' stroke='{color}' stroke-width='2' points='{}'/>",
            points.join(" ")
        );
        let _ = writeln!(
            out,
            "<text x='{}' y='{}' fill='{color}'>{name}</text>",
            left + pw + 12.0,
            top + 14.0 + i as f64 * 18.0
        );
    }
    out.push_str("</svg>\n");
    out
}
