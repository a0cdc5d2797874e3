//! PNG plots of evaluation curves against the threshold.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// Fonts tried, in order, when none is given: common locations on Linux and macOS.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// One curve: a label, a colour, and (threshold, share in [0, 1]) points.
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub dashed: bool,
    pub points: Vec<(f32, f64)>,
}

fn font_file(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    FONT_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .context("no TrueType font found for the plot's labels; pass one with --font FILE.ttf")
}

/// Draws the series as lines on a percentage axis and writes a PNG.
pub fn plot(path: &Path, title: &str, series: &[Series], font: Option<&Path>) -> anyhow::Result<()> {
    let font = font_file(font)?;
    let bytes = std::fs::read(&font).with_context(|| format!("cannot read the font {}", font.display()))?;
    // plotters keeps registered fonts for the life of the process.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("{} is not a TrueType font plotters can use", font.display()))?;

    let (x_min, x_max) = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold((1.0f32, 0.0f32), |(lo, hi), x| (lo.min(x), hi.max(x)));
    anyhow::ensure!(x_min < x_max, "a plot needs at least two thresholds");

    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x_min..x_max, 0.0f64..100.0)?;
    chart
        .configure_mesh()
        .x_desc("similarity threshold")
        .y_desc("% of queries")
        .x_label_formatter(&|x| format!("{x:.2}"))
        .y_label_formatter(&|y| format!("{y:.0}%"))
        .label_style(("sans-serif", 16))
        .draw()?;
    for s in series {
        let style = ShapeStyle::from(&s.color).stroke_width(3);
        let points = s.points.iter().map(|&(x, y)| (x, y * 100.0));
        let drawn = if s.dashed {
            chart.draw_series(DashedLineSeries::new(points, 10, 6, style))?
        } else {
            chart.draw_series(LineSeries::new(points, style))?
        };
        let color = s.color;
        drawn
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()
        .with_context(|| format!("cannot write the plot to {}", path.display()))?;
    Ok(())
}
