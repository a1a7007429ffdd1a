//! Line plots (SVG, drawn with plotters): robust accuracy against ε, bits and data fraction.

use std::path::Path;

use plotters::prelude::*;

use crate::{Error, Result};

/// One line: a name and its (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A plot: title, axis labels, whether x is logarithmic, and the lines.
pub struct LinePlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_log: bool,
    pub series: Vec<Series>,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::BadData {
        path: path.to_path_buf(),
        problem: format!("drawing the plot: {e}"),
    }
}

impl LinePlot {
    /// Draws the plot to an SVG file (written atomically). Accuracies are plotted in %.
    pub fn write_svg(&self, path: &Path) -> Result<()> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (720, 450)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
            let xs: Vec<f64> = self
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.0))
                .collect();
            let (mut x0, mut x1) = xs
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            if !x0.is_finite() {
                (x0, x1) = (0.0, 1.0);
            }
            if x1 <= x0 {
                x1 = x0 + 1.0;
            }
            let mut builder = ChartBuilder::on(&root);
            let chart = builder
                .caption(&self.title, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(50);
            macro_rules! draw {
                ($chart:expr) => {{
                    let mut chart = $chart;
                    chart
                        .configure_mesh()
                        .x_desc(&self.x_label)
                        .y_desc(&self.y_label)
                        .draw()
                        .map_err(|e| plot_err(path, e))?;
                    for (i, s) in self.series.iter().enumerate() {
                        let c = COLORS[i % COLORS.len()];
                        let pts: Vec<(f64, f64)> =
                            s.points.iter().map(|&(x, y)| (x, 100.0 * y)).collect();
                        chart
                            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                            .map_err(|e| plot_err(path, e))?
                            .label(s.name.clone())
                            .legend(move |(x, y)| {
                                PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                            });
                        chart
                            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                            .map_err(|e| plot_err(path, e))?;
                    }
                    chart
                        .configure_series_labels()
                        .background_style(WHITE.mix(0.8))
                        .border_style(BLACK)
                        .draw()
                        .map_err(|e| plot_err(path, e))?;
                }};
            }
            if self.x_log && x0 > 0.0 {
                draw!(chart
                    .build_cartesian_2d((x0 * 0.8..x1 * 1.25).log_scale(), 0.0..100.0)
                    .map_err(|e| plot_err(path, e))?);
            } else {
                let pad = 0.05 * (x1 - x0);
                draw!(chart
                    .build_cartesian_2d(x0 - pad..x1 + pad, 0.0..100.0)
                    .map_err(|e| plot_err(path, e))?);
            }
            root.present().map_err(|e| plot_err(path, e))?;
        }
        crate::io::write_bytes_atomic(path, svg.as_bytes())
    }
}
