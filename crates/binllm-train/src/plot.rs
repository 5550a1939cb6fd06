//! The training-curve plot written at the end of a run: training loss per step, validation
//! loss per phase (training form and sign form), and t on a log axis.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// Points (step, value) of one curve.
type Curve = [(f64, f64)];

pub struct Curves {
    /// (global Stage-2 step, training loss).
    pub train_loss: Vec<(f64, f64)>,
    /// (step at phase end, validation loss in the training form).
    pub val_loss: Vec<(f64, f64)>,
    /// (step at phase end, validation loss of the sign form).
    pub val_loss_sign: Vec<(f64, f64)>,
    /// (step, t).
    pub t: Vec<(f64, f64)>,
}

/// Registers DejaVu Sans, embedded in the binary by the `dejavu` crate, as plotters'
/// "sans-serif": plotters draws text only with a font it has been given, and the machines
/// that train (GPU servers, containers) often have no fonts installed.
fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    });
    anyhow::ensure!(ok, "the embedded DejaVu Sans font did not load");
    Ok(())
}

/// Size of the training plot in pixels.
const SIZE: (u32, u32) = (1100, 650);

pub fn plot(curves: &Curves, title: &str, path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    draw(curves, title, &root)?;
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// Draws the curves with their title, axis labels and legend on `root`.
fn draw<DB: DrawingBackend>(
    curves: &Curves,
    title: &str,
    root: &DrawingArea<DB, plotters::coord::Shift>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    register_font()?;
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let all_losses = curves
        .train_loss
        .iter()
        .chain(&curves.val_loss)
        .chain(&curves.val_loss_sign)
        .map(|p| p.1);
    let (lo, hi) = all_losses.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo < hi {
        (lo * 0.95, hi * 1.05)
    } else {
        (0.0, 1.0)
    };
    let max_step = curves.train_loss.iter().map(|p| p.0).fold(1.0, f64::max);
    let t_max = curves.t.iter().map(|p| p.1).fold(1.0, f64::max) * 1.5;
    let mut builder = ChartBuilder::on(root);
    builder
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(60);
    builder.caption(title, ("sans-serif", 22));
    let mut chart = builder
        .build_cartesian_2d(0f64..max_step, lo..hi)
        .map_err(|e| anyhow!("{e}"))?
        .set_secondary_coord(0f64..max_step, (0.1f64..t_max).log_scale());
    chart
        .configure_mesh()
        .x_desc("Stage-2 step")
        .y_desc("loss (nats/token)")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_secondary_axes()
        .y_desc("t (log scale)")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let series: [(&Curve, RGBColor, &str); 3] = [
        (&curves.train_loss, RGBColor(70, 110, 200), "training loss"),
        (
            &curves.val_loss,
            RGBColor(230, 120, 20),
            "validation loss (training form)",
        ),
        (
            &curves.val_loss_sign,
            RGBColor(200, 30, 60),
            "validation loss (sign form)",
        ),
    ];
    for (points, color, name) in series {
        let drawn = chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        drawn.label(name).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
        });
    }
    let t_color = RGBColor(60, 160, 60);
    let drawn = chart
        .draw_secondary_series(LineSeries::new(
            curves.t.iter().copied(),
            t_color.stroke_width(1),
        ))
        .map_err(|e| anyhow!("{e}"))?;
    drawn
        .label("t (right axis)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], t_color));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders into memory and counts dark pixels in the caption band above the chart.
    fn caption_ink(title: &str) -> usize {
        let curves = Curves {
            train_loss: (0..50).map(|i| (i as f64, 5.0 - i as f64 * 0.05)).collect(),
            val_loss: vec![(25.0, 4.0), (50.0, 3.5)],
            val_loss_sign: vec![(25.0, 4.5), (50.0, 3.7)],
            t: (0..50).map(|i| (i as f64, 0.3 + i as f64)).collect(),
        };
        let (w, h) = SIZE;
        let mut pixels = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
            draw(&curves, title, &root).unwrap();
            root.present().unwrap();
        }
        // The caption sits in the top margin, above the plotting area.
        pixels[..(w * 45 * 3) as usize]
            .chunks(3)
            .filter(|p| p.iter().all(|&c| c < 128))
            .count()
    }

    #[test]
    fn labels_are_drawn_with_the_embedded_font() {
        // A caption needs no installed font: the ink of a long title far exceeds a short one.
        let long = caption_ink("binllm convert: binaryllm on a model with a long name");
        let short = caption_ink("x");
        assert!(short > 0, "even a one-letter caption leaves ink");
        assert!(long > 10 * short, "caption ink: long {long}, short {short}");
    }
}
