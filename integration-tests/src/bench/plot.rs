//! Draws the [`Chart`]s of `bench --plot DIR` as SVG files, `DIR/<id>.svg`, with
//! plotters' SVG backend alone: text is written as SVG `<text>` in a generic sans-serif
//! family that the viewer resolves, laid out by plotters' estimate (no font file, no
//! fontconfig).
//!
//! Each chart is first turned into a [`Plot`] (pure data: axes, curves in plot
//! coordinates, reference lines), which [`draw`] then renders. A log axis is drawn as a
//! linear axis of log10 of the values, labelled with the values themselves.
//!
//! - [`Chart::Distribution`]: the empirical CDF of each series (x: the value, log scale;
//!   y: the fraction of samples at or below it), with light reference lines at p50 and
//!   p99; the legend (below the chart) gives each series' p50, p99 and sample count.
//! - [`Chart::Lines`]: one line with a marker per point for each series.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::chart::Chart;
use crate::report::{num, percentile};

/// Width of every chart, and height without the legend, in pixels.
pub const SIZE: (u32, u32) = (800, 440);
/// Height of the legend below the chart: a margin and a row per series.
const LEGEND_MARGIN: u32 = 12;
const LEGEND_ROW: u32 = 22;
/// Left edge of the chart's axes: margin and y label area, where the legend starts too.
const MARGIN: u32 = 12;
const Y_LABEL_AREA: u32 = 70;

const FONT: &str = "sans-serif";
/// plotters' SVG backend writes font sizes divided by 1.24: these are 12-18 px.
const TITLE_SIZE: f64 = 22.0;
const AXIS_DESC_SIZE: f64 = 17.0;
const TICK_SIZE: f64 = 15.0;
const LEGEND_SIZE: f64 = 15.0;
/// Rough size of the plotting area (the chart less its title, margins and axis labels),
/// for thinning curves to about a point per pixel.
const AREA_GUESS: (f64, f64) = (700.0, 380.0);
/// The narrowest log axis, in decades (a factor of 4), so that a single value or a
/// tight cluster still gets a readable axis with ticks.
const MIN_DECADES: f64 = 0.6;

/// Tableau's ten colours: tether's series (the first) is blue.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const GRID: RGBColor = RGBColor(228, 228, 228);
const TEXT: RGBColor = RGBColor(30, 30, 30);
const REFERENCE: RGBColor = RGBColor(150, 150, 150);

/// The chart's id, its file name less `.svg`.
pub fn id(chart: &Chart) -> &str {
    match chart {
        Chart::Distribution { id, .. } | Chart::Lines { id, .. } => id,
    }
}

/// Renders `chart` into `dir/<id>.svg` (`dir` must exist); returns the file's path.
pub fn write(chart: &Chart, dir: &Path) -> anyhow::Result<PathBuf> {
    let id = id(chart);
    let valid =
        !id.is_empty() && !id.starts_with('.') && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !valid {
        bail!("chart id {id:?} is not a plain file name (letters, digits, '-', '_', '.')");
    }
    let svg = render(chart).with_context(|| format!("cannot draw chart {id:?}"))?;
    let path = dir.join(format!("{id}.svg"));
    std::fs::write(&path, svg).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The SVG document of `chart`. A panic inside plotters (none is known for the inputs
/// [`Plot`] produces) is turned into an error: a chart is not worth the bench's run.
pub fn render(chart: &Chart) -> anyhow::Result<String> {
    let plot = match chart {
        Chart::Distribution {
            title, unit, series, ..
        } => distribution(title, unit, series),
        Chart::Lines {
            title,
            x_label,
            y_label,
            log_x,
            series,
            ..
        } => lines(title, x_label, y_label, *log_x, series),
    };
    std::panic::catch_unwind(|| draw(&plot)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        Err(anyhow!("plotters panicked: {msg}"))
    })
}

/// One axis. `lo` and `hi` are in plot coordinates (log10 of the value on a log axis),
/// `ticks` in values.
#[derive(Debug, Clone, PartialEq)]
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Axis {
    fn to_plot(&self, v: f64) -> f64 {
        if self.log {
            v.log10()
        } else {
            v
        }
    }

    fn to_value(&self, p: f64) -> f64 {
        if self.log {
            10f64.powf(p)
        } else {
            p
        }
    }

    /// `p` (plot coordinates) as a fraction of the axis, 0 at `lo`, 1 at `hi`.
    fn fraction(&self, p: f64) -> f64 {
        (p - self.lo) / (self.hi - self.lo)
    }
}

/// An [`Axis`] as plotters' coordinate: linear in plot coordinates, its ticks (in plot
/// coordinates) the only key points.
struct Ticked {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ticked {
    fn new(axis: &Axis) -> Ticked {
        Ticked {
            lo: axis.lo,
            hi: axis.hi,
            ticks: axis.ticks.iter().map(|v| axis.to_plot(*v)).collect(),
        }
    }
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let f = (value - self.lo) / (self.hi - self.lo);
        // `as` saturates (and maps NaN to 0): never a panic.
        (f64::from(limit.0) + f * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // No light (minor) grid lines.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.lo..self.hi
    }
}

/// A log axis over the values `min..=max` (positive and finite), padded a little and at
/// least [`MIN_DECADES`] wide; `None` (no data) gives 1..10.
fn log_axis(range: Option<(f64, f64)>) -> Axis {
    let (mut lo, mut hi) = match range {
        Some((min, max)) => (min.log10(), max.log10()),
        None => (0.0, 1.0),
    };
    if hi - lo < MIN_DECADES {
        let mid = (lo + hi) / 2.0;
        lo = mid - MIN_DECADES / 2.0;
        hi = mid + MIN_DECADES / 2.0;
    }
    let pad = (hi - lo) * 0.04;
    let (lo, hi) = (lo - pad, hi + pad);
    Axis {
        log: true,
        lo,
        hi,
        ticks: log_ticks(lo, hi),
    }
}

/// Values to label on a log axis from 10^lo to 10^hi: more of them per decade the fewer
/// decades the axis spans (about 8 to 12 in all, never two that would collide).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let decades = hi - lo;
    let (mantissas, stride): (&[f64], i32) = if decades <= 1.3 {
        (&[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0], 1)
    } else if decades <= 2.6 {
        (&[1.0, 2.0, 5.0], 1)
    } else if decades <= 5.0 {
        (&[1.0, 3.0], 1)
    } else {
        (&[1.0], (decades / 8.0).ceil().max(1.0) as i32)
    };
    let mut ticks = Vec::new();
    // A little slack so that a tick on an edge survives rounding.
    let eps = decades * 1e-9;
    for e in (lo.floor() as i32)..=(hi.ceil() as i32) {
        if e.rem_euclid(stride) != 0 {
            continue;
        }
        for m in mantissas {
            let v = m * 10f64.powi(e);
            let p = v.log10();
            if p >= lo - eps && p <= hi + eps {
                ticks.push(v);
            }
        }
    }
    ticks
}

/// A linear axis over `min..=max` (finite), with `0` in it if `with_zero`, ending on
/// ticks 1, 2 or 5 times a power of ten apart, with a little room past the data.
fn linear_axis(range: Option<(f64, f64)>, with_zero: bool) -> Axis {
    let (mut min, mut max) = range.unwrap_or((0.0, 1.0));
    if with_zero {
        min = min.min(0.0);
        max = max.max(0.0);
    }
    if max - min <= f64::EPSILON * max.abs().max(min.abs()) {
        let d = if max.abs() > 0.0 { max.abs() * 0.5 } else { 1.0 };
        // An axis pinned to zero stays there.
        if !(with_zero && min == 0.0) {
            min -= d;
        }
        max += d;
    }
    let span = max - min;
    if !(with_zero && min == 0.0) {
        min -= span * 0.03;
    }
    if !(with_zero && max == 0.0) {
        max += span * 0.03;
    }
    let step = nice_step((max - min) / 8.0);
    let (lo, hi) = ((min / step).floor() * step, (max / step).ceil() * step);
    let n = ((hi - lo) / step).round() as usize;
    let ticks = (0..=n).map(|i| lo + i as f64 * step).collect();
    Axis {
        log: false,
        lo,
        hi,
        ticks,
    }
}

/// The smallest of 1, 2 or 5 times a power of ten that is at least `raw` (> 0).
fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag)
}

/// A tick label: at most four significant digits, no trailing zeros (0.3, 1.5, 200,
/// 2e-5, 1e6).
fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a < 1e-12 {
        return "0".to_owned();
    }
    let trim = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    if !(1e-4..1e6).contains(&a) {
        let s = format!("{v:.3e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        return format!("{}e{exp}", trim(mantissa.to_owned()));
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 8) as usize;
    trim(format!("{v:.decimals$}"))
}

/// The finite samples (positive ones only if `positive`), sorted, and how many others
/// were left out.
fn clean(samples: &[f64], positive: bool) -> (Vec<f64>, usize) {
    let mut kept: Vec<f64> = samples
        .iter()
        .copied()
        .filter(|v| v.is_finite() && (!positive || *v > 0.0))
        .collect();
    kept.sort_by(f64::total_cmp);
    let dropped = samples.len() - kept.len();
    (kept, dropped)
}

/// The empirical CDF of `sorted` as a staircase: for each distinct value x, the points
/// (x, fraction below x) and (x, fraction at or below x).
fn ecdf_steps(sorted: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted.len() as f64;
    let mut out = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let x = sorted[i];
        let below = i as f64 / n;
        while i < sorted.len() && sorted[i] == x {
            i += 1;
        }
        out.push((x, below));
        out.push((x, i as f64 / n));
    }
    out
}

/// Drops the points of a path (in plot coordinates) that lie within `tol` (x, y) of the
/// last point kept; the first and last points always stay.
fn thin(points: &[(f64, f64)], tol: (f64, f64)) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(points.len().min(4096));
    for (i, &p) in points.iter().enumerate() {
        let keep = match out.last() {
            None => true,
            Some(&(x, y)) => (p.0 - x).abs() >= tol.0 || (p.1 - y).abs() >= tol.1 || i + 1 == points.len(),
        };
        if keep {
            out.push(p);
        }
    }
    out
}

/// One series as drawn.
#[derive(Debug, Clone)]
struct Curve {
    /// Its legend entry.
    label: String,
    color: RGBColor,
    /// In plot coordinates.
    points: Vec<(f64, f64)>,
    /// A dot on every point.
    markers: bool,
}

/// A chart reduced to what is drawn.
#[derive(Debug, Clone)]
struct Plot {
    title: String,
    x_desc: String,
    y_desc: String,
    x: Axis,
    y: Axis,
    curves: Vec<Curve>,
    /// Light horizontal lines: (y in plot coordinates, label).
    references: Vec<(f64, String)>,
    /// Written across the middle (e.g. "no samples").
    note: Option<String>,
}

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Empirical CDFs of each series on a log axis of the value.
fn distribution(title: &str, unit: &str, series: &[(String, Vec<f64>)]) -> Plot {
    let cleaned: Vec<(Vec<f64>, usize)> = series.iter().map(|(_, v)| clean(v, true)).collect();
    let min = cleaned.iter().filter_map(|(v, _)| v.first()).copied().reduce(f64::min);
    let max = cleaned.iter().filter_map(|(v, _)| v.last()).copied().reduce(f64::max);
    let x = log_axis(min.zip(max));
    let y = Axis {
        log: false,
        lo: -0.02,
        hi: 1.02,
        ticks: (0..=10).map(|i| f64::from(i) / 10.0).collect(),
    };
    let tol = ((x.hi - x.lo) / AREA_GUESS.0, (y.hi - y.lo) / AREA_GUESS.1);
    let curves = series
        .iter()
        .zip(&cleaned)
        .enumerate()
        .map(|(i, ((name, _), (sorted, dropped)))| {
            let mut label = if sorted.is_empty() {
                format!("{name}: no samples")
            } else {
                format!(
                    "{name}: p50 {} {unit}, p99 {} {unit} (n={})",
                    num(percentile(sorted, 50.0)),
                    num(percentile(sorted, 99.0)),
                    sorted.len()
                )
            };
            if *dropped > 0 {
                label.push_str(&format!(", {dropped} not > 0 left out"));
            }
            let steps: Vec<(f64, f64)> = ecdf_steps(sorted).into_iter().map(|(v, f)| (x.to_plot(v), f)).collect();
            Curve {
                label,
                color: color(i),
                points: thin(&steps, tol),
                markers: false,
            }
        })
        .collect();
    let all_empty = cleaned.iter().all(|(v, _)| v.is_empty());
    Plot {
        title: title.to_owned(),
        x_desc: format!("{unit} (log scale)"),
        y_desc: "fraction of samples at or below".to_owned(),
        x,
        y,
        curves,
        references: vec![(0.5, "p50".to_owned()), (0.99, "p99".to_owned())],
        note: all_empty.then(|| "no samples".to_owned()),
    }
}

/// One line per series, a dot per point.
fn lines(title: &str, x_label: &str, y_label: &str, log_x: bool, series: &[(String, Vec<(f64, f64)>)]) -> Plot {
    let ok = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!log_x || x > 0.0);
    let kept: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|(_, p)| p.iter().copied().filter(ok).collect())
        .collect();
    let all = || kept.iter().flatten();
    let range = |it: &mut dyn Iterator<Item = f64>| {
        it.fold(None, |acc: Option<(f64, f64)>, v| {
            Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
        })
    };
    let x_range = range(&mut all().map(|p| p.0));
    let y_range = range(&mut all().map(|p| p.1));
    let x = if log_x {
        log_axis(x_range)
    } else {
        linear_axis(x_range, false)
    };
    let y = linear_axis(y_range, true);
    let curves = series
        .iter()
        .zip(&kept)
        .enumerate()
        .map(|(i, ((name, points), kept))| {
            let mut label = name.clone();
            let dropped = points.len() - kept.len();
            if dropped > 0 {
                label.push_str(&format!(" ({dropped} points left out)"));
            }
            Curve {
                label,
                color: color(i),
                points: kept.iter().map(|&(px, py)| (x.to_plot(px), py)).collect(),
                markers: true,
            }
        })
        .collect();
    Plot {
        title: title.to_owned(),
        x_desc: if log_x {
            format!("{x_label} (log scale)")
        } else {
            x_label.to_owned()
        },
        y_desc: y_label.to_owned(),
        x,
        y,
        curves,
        references: Vec::new(),
        note: kept.iter().all(Vec::is_empty).then(|| "no data".to_owned()),
    }
}

fn draw(plot: &Plot) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let rows = plot.curves.len() as u32;
        let legend_h = if rows == 0 {
            0
        } else {
            LEGEND_MARGIN + LEGEND_ROW * rows
        };
        let root = SVGBackend::with_string(&mut svg, (SIZE.0, SIZE.1 + legend_h)).into_drawing_area();
        root.fill(&WHITE)?;
        let (upper, legend) = root.split_vertically(SIZE.1);
        // Shrink a title too long for the width (plotters estimates 0.7 em a character).
        let title_px = TITLE_SIZE / 1.24 / 1.24 * 0.7 * plot.title.chars().count() as f64;
        let title_size = TITLE_SIZE * (f64::from(SIZE.0 - 30) / title_px).min(1.0);
        let (x, y) = (&plot.x, &plot.y);
        let mut chart = ChartBuilder::on(&upper)
            .caption(&plot.title, (FONT, title_size))
            .margin(MARGIN)
            .margin_right(28)
            .x_label_area_size(50)
            .y_label_area_size(Y_LABEL_AREA)
            .build_cartesian_2d(Ticked::new(x), Ticked::new(y))?;
        let x_fmt = |p: &f64| fmt_tick(x.to_value(*p));
        let y_fmt = |p: &f64| fmt_tick(y.to_value(*p));
        chart
            .configure_mesh()
            .x_desc(&plot.x_desc)
            .y_desc(&plot.y_desc)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .axis_desc_style((FONT, AXIS_DESC_SIZE))
            .label_style((FONT, TICK_SIZE))
            .bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
            .draw()?;

        let span_x = x.hi - x.lo;
        for (ry, label) in &plot.references {
            chart.draw_series(DashedLineSeries::new(
                [(x.lo, *ry), (x.hi, *ry)],
                6,
                4,
                REFERENCE.stroke_width(1),
            ))?;
            // Below the line near the top, above it elsewhere.
            let below = y.fraction(*ry) > 0.9;
            let style = TextStyle::from((FONT, TICK_SIZE).into_font())
                .color(&REFERENCE)
                .pos(Pos::new(HPos::Left, if below { VPos::Top } else { VPos::Bottom }));
            let dy = (y.hi - y.lo) * 0.006 * if below { -1.0 } else { 1.0 };
            chart.draw_series(std::iter::once(Text::new(
                label.clone(),
                (x.lo + span_x * 0.01, ry + dy),
                style,
            )))?;
        }

        for curve in &plot.curves {
            let style = curve.color.stroke_width(2);
            chart.draw_series(LineSeries::new(curve.points.iter().copied(), style))?;
            if curve.markers {
                chart.draw_series(curve.points.iter().map(|p| Circle::new(*p, 4, style.filled())))?;
            }
        }

        if let Some(note) = &plot.note {
            let style = TextStyle::from((FONT, AXIS_DESC_SIZE).into_font())
                .color(&REFERENCE)
                .pos(Pos::new(HPos::Center, VPos::Center));
            let at = ((x.lo + x.hi) / 2.0, (y.lo + y.hi) / 2.0);
            chart.draw_series(std::iter::once(Text::new(note.clone(), at, style)))?;
        }

        // The legend, below the chart: it never hides a curve.
        let text = TextStyle::from((FONT, LEGEND_SIZE).into_font())
            .color(&TEXT)
            .pos(Pos::new(HPos::Left, VPos::Center));
        for (i, curve) in plot.curves.iter().enumerate() {
            let style = curve.color.stroke_width(2);
            let dot = if curve.markers {
                style.filled()
            } else {
                TRANSPARENT.filled()
            };
            let at = (
                (MARGIN + Y_LABEL_AREA) as i32,
                (LEGEND_ROW * i as u32 + LEGEND_ROW / 2) as i32,
            );
            legend.draw(
                &(EmptyElement::at(at)
                    + PathElement::new(vec![(0, 0), (24, 0)], style)
                    + Circle::new((12, 0), 4, dot)
                    + Text::new(curve.label.clone(), (34, 0), text.clone())),
            )?;
        }
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn ecdf_is_a_staircase_over_distinct_values() {
        assert_eq!(
            ecdf_steps(&[1.0, 2.0, 2.0, 3.0]),
            vec![
                (1.0, 0.0),
                (1.0, 0.25),
                (2.0, 0.25),
                (2.0, 0.75),
                (3.0, 0.75),
                (3.0, 1.0)
            ]
        );
        assert_eq!(ecdf_steps(&[5.0]), vec![(5.0, 0.0), (5.0, 1.0)]);
        assert_eq!(ecdf_steps(&[]), Vec::<(f64, f64)>::new());
        assert_eq!(ecdf_steps(&[2.0, 2.0]), vec![(2.0, 0.0), (2.0, 1.0)]);
    }

    #[test]
    fn clean_sorts_and_drops_what_a_log_axis_cannot_show() {
        let (v, dropped) = clean(&[3.0, f64::NAN, 1.0, 0.0, -2.0, f64::INFINITY, 2.0], true);
        assert_eq!(v, vec![1.0, 2.0, 3.0]);
        assert_eq!(dropped, 4);
        let (v, dropped) = clean(&[0.0, -1.0, f64::NEG_INFINITY], false);
        assert_eq!(v, vec![-1.0, 0.0]);
        assert_eq!(dropped, 1);
    }

    #[test]
    fn thinning_keeps_the_ends_and_the_shape() {
        let pts: Vec<(f64, f64)> = (0..=1000)
            .map(|i| (f64::from(i) / 1000.0, f64::from(i) / 1000.0))
            .collect();
        let t = thin(&pts, (0.01, 0.01));
        assert_eq!(t.first(), Some(&(0.0, 0.0)));
        assert_eq!(t.last(), Some(&(1.0, 1.0)));
        assert!(t.len() <= 102, "{} points", t.len());
        // A jump is never smoothed away.
        let t = thin(&[(0.0, 0.0), (0.0001, 0.0), (0.0001, 1.0), (0.0002, 1.0)], (0.01, 0.01));
        assert_eq!(t, vec![(0.0, 0.0), (0.0001, 1.0), (0.0002, 1.0)]);
        assert_eq!(thin(&[], (1.0, 1.0)), vec![]);
        assert_eq!(thin(&[(1.0, 1.0)], (1.0, 1.0)), vec![(1.0, 1.0)]);
    }

    #[test]
    fn log_axis_covers_the_data_with_ticks() {
        let a = log_axis(Some((0.05, 20.0)));
        assert!(a.lo < 0.05f64.log10() && a.hi > 20f64.log10());
        assert!(a.ticks.len() >= 3, "{:?}", a.ticks);
        assert!(a.ticks.iter().all(|t| a.to_plot(*t) >= a.lo && a.to_plot(*t) <= a.hi));
        // One value, a tight cluster, no data: still an axis with at least three ticks.
        for range in [Some((0.5, 0.5)), Some((0.51, 0.52)), Some((7e-6, 7e-6)), None] {
            let a = log_axis(range);
            assert!(a.hi - a.lo >= MIN_DECADES, "{range:?}: {a:?}");
            assert!(a.ticks.len() >= 3, "{range:?}: {a:?}");
            if let Some((v, _)) = range {
                assert!(a.lo < v.log10() && a.hi > v.log10());
            }
        }
        // Many decades: few ticks, one per decade or fewer.
        let a = log_axis(Some((1e-6, 1e9)));
        assert!((2..=12).contains(&a.ticks.len()), "{:?}", a.ticks);
    }

    #[test]
    fn log_ticks_thin_out_with_the_span() {
        assert_eq!(
            log_ticks(0.0, 1.0).iter().map(|v| fmt_tick(*v)).collect::<Vec<_>>(),
            ["1", "1.5", "2", "3", "4", "5", "6", "8", "10"]
        );
        assert_eq!(
            log_ticks(-1.0, 1.0).iter().map(|v| fmt_tick(*v)).collect::<Vec<_>>(),
            ["0.1", "0.2", "0.5", "1", "2", "5", "10"]
        );
        assert_eq!(log_ticks(-3.0, 1.0).len(), 9);
        assert!(log_ticks(-20.0, 20.0).len() <= 9);
    }

    #[test]
    fn linear_axis_edge_cases() {
        let a = linear_axis(Some((3.0, 97.0)), true);
        assert!(close(a.lo, 0.0) && a.hi >= 97.0, "{a:?}");
        assert!(a.ticks.len() >= 3 && a.ticks.len() <= 12, "{a:?}");
        assert!(close(*a.ticks.first().unwrap(), a.lo) && close(*a.ticks.last().unwrap(), a.hi));
        // All equal, all zero, no data, negative only.
        for (range, zero) in [
            (Some((5.0, 5.0)), false),
            (Some((5.0, 5.0)), true),
            (Some((0.0, 0.0)), true),
            (None, true),
            (Some((-4.0, -1.0)), true),
            (Some((1e-9, 2e-9)), false),
        ] {
            let a = linear_axis(range, zero);
            assert!(a.lo < a.hi, "{range:?}: {a:?}");
            assert!(a.ticks.len() >= 2, "{range:?}: {a:?}");
            if let Some((min, max)) = range {
                assert!(a.lo <= min && a.hi >= max, "{range:?}: {a:?}");
            }
            if zero {
                assert!(a.lo <= 0.0 && a.hi >= 0.0, "{range:?}: {a:?}");
            }
        }
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(fmt_tick(0.0), "0");
        assert_eq!(fmt_tick(3.0 * 0.1), "0.3");
        assert_eq!(fmt_tick(1.5), "1.5");
        assert_eq!(fmt_tick(200.0), "200");
        assert_eq!(fmt_tick(0.05), "0.05");
        assert_eq!(fmt_tick(-0.25), "-0.25");
        assert_eq!(fmt_tick(2e-5), "2e-5");
        assert_eq!(fmt_tick(1e6), "1e6");
        assert_eq!(fmt_tick(12345.0), "12345");
        assert_eq!(fmt_tick(0.1 + 0.2), "0.3");
    }

    fn dist(series: Vec<(&str, Vec<f64>)>) -> Chart {
        Chart::Distribution {
            id: "d".into(),
            title: "latency <per> \"build\" & more".into(),
            unit: "ms".into(),
            series: series.into_iter().map(|(n, v)| (n.to_owned(), v)).collect(),
        }
    }

    #[test]
    fn distribution_legend_and_curves() {
        let Chart::Distribution {
            title, unit, series, ..
        } = dist(vec![
            ("tether", (1..=100).map(f64::from).collect()),
            ("baseline", vec![0.5, -1.0, f64::NAN]),
            ("empty", vec![]),
        ])
        else {
            unreachable!()
        };
        let p = distribution(&title, &unit, &series);
        assert_eq!(p.curves.len(), 3);
        assert_eq!(p.curves[0].label, "tether: p50 50 ms, p99 99 ms (n=100)");
        assert_eq!(
            p.curves[1].label,
            "baseline: p50 0.500 ms, p99 0.500 ms (n=1), 2 not > 0 left out"
        );
        assert_eq!(p.curves[2].label, "empty: no samples");
        assert!(p.curves[2].points.is_empty());
        assert_eq!(p.curves[0].points.last(), Some(&(2.0, 1.0)));
        assert!(p.x.lo < 0.5f64.log10() && p.x.hi > 2.0);
        assert_ne!(p.curves[0].color, p.curves[1].color);
        assert!(p.note.is_none());
    }

    #[test]
    fn every_edge_case_renders() {
        let charts = vec![
            dist(vec![]),
            dist(vec![("empty", vec![]), ("zeros", vec![0.0, 0.0])]),
            dist(vec![("one", vec![0.7])]),
            dist(vec![("same", vec![3.0; 50]), ("nan", vec![f64::NAN, f64::INFINITY])]),
            dist(vec![("wide", vec![1e-7, 1e-3, 5.0, 1e8])]),
            dist(vec![("many", (1..=20_000).map(|i| f64::from(i) * 1e-3).collect())]),
            Chart::Lines {
                id: "l".into(),
                title: "throughput".into(),
                x_label: "concurrency".into(),
                y_label: "builds/s".into(),
                log_x: true,
                series: vec![
                    (
                        "tether".into(),
                        vec![(1.0, 10.0), (4.0, 35.0), (16.0, 90.0), (64.0, 120.0)],
                    ),
                    ("baseline".into(), vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0)]),
                    ("single".into(), vec![(8.0, 50.0)]),
                    ("none".into(), vec![]),
                ],
            },
            Chart::Lines {
                id: "l".into(),
                title: "empty".into(),
                x_label: "x".into(),
                y_label: "y".into(),
                log_x: false,
                series: vec![("a".into(), vec![]), ("b".into(), vec![(f64::NAN, 1.0)])],
            },
            Chart::Lines {
                id: "l".into(),
                title: "flat".into(),
                x_label: "x".into(),
                y_label: "y".into(),
                log_x: false,
                series: vec![("a".into(), vec![(2.0, -3.0), (2.0, -3.0)])],
            },
        ];
        for c in &charts {
            let svg = render(c).unwrap_or_else(|e| panic!("{c:?}: {e:#}"));
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{c:?}: {svg}");
        }
        let svg = render(&charts[3]).unwrap();
        assert!(
            svg.contains("latency &lt;per&gt; &quot;build&quot; &amp; more"),
            "{svg}"
        );
        assert!(svg.contains("same: p50 3.00 ms"));
        assert!(render(&charts[0]).unwrap().contains("no samples"));
    }

    #[test]
    fn write_names_the_file_for_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let c = dist(vec![("a", vec![1.0, 2.0])]);
        let path = write(&c, dir.path()).unwrap();
        assert_eq!(path, dir.path().join("d.svg"));
        assert!(std::fs::read_to_string(&path).unwrap().contains("</svg>"));
        for bad in ["", "../x", "a/b", ".hidden"] {
            let c = Chart::Distribution {
                id: bad.into(),
                title: String::new(),
                unit: String::new(),
                series: vec![],
            };
            assert!(write(&c, dir.path()).is_err(), "{bad:?}");
        }
    }
}
