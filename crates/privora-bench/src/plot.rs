//! The latency-vs-load plot of `compare`: a PNG drawn with plotters' bitmap backend. Text is
//! drawn with ab_glyph from a TrueType file found on the machine (no fontconfig needed); without
//! one the plot is skipped, with a message.

use std::path::Path;

use anyhow::{bail, Context};
use plotters::prelude::*;

/// One plotted line: which target's points, which latency, its label and colour.
type Series = (&'static str, fn(&Point) -> f64, &'static str, RGBColor);

/// One point per (target, offered load).
pub struct Point {
    pub label: &'static str,
    pub offered: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> anyhow::Result<()> {
    let Some(bytes) = FONTS.iter().find_map(|path| std::fs::read(path).ok()) else {
        bail!("no TrueType font found (looked for DejaVu Sans / Liberation Sans)");
    };
    // Loaded once per process; plotters keeps fonts for the program's lifetime.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("the font file is not a valid TrueType font"))
}

/// Draws p50 and p99 latency against offered load for each target.
pub fn latency_vs_load(path: &Path, title: &str, points: &[Point]) -> anyhow::Result<()> {
    register_font()?;
    if points.is_empty() {
        bail!("nothing to plot");
    }
    let x_max = points.iter().map(|p| p.offered).fold(0.0, f64::max) * 1.05;
    let y_max = points.iter().map(|p| p.p99_ms).fold(0.1, f64::max) * 1.5;
    let y_min = points.iter().map(|p| p.p50_ms).fold(f64::MAX, f64::min).max(0.01) / 1.5;
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("offered load (messages/s)")
        .y_desc("end-to-end latency (ms, log scale)")
        .draw()
        .map_err(draw)?;
    let series: [Series; 4] = [
        ("relay", |p| p.p50_ms, "bare relay p50", BLUE),
        ("relay", |p| p.p99_ms, "bare relay p99", CYAN),
        ("privora", |p| p.p50_ms, "privora (SQLite) p50", RED),
        ("privora", |p| p.p99_ms, "privora (SQLite) p99", MAGENTA),
    ];
    for (label, value, name, color) in series {
        let mut line: Vec<(f64, f64)> =
            points.iter().filter(|p| p.label == label).map(|p| (p.offered, value(p).max(y_min))).collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(draw)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(line.into_iter().map(|xy| Circle::new(xy, 4, color.filled()))).map_err(draw)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(draw)?;
    root.present().context("cannot write the plot")?;
    Ok(())
}

fn draw<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot failed: {error:?}")
}
