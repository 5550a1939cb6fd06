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

/// A TrueType font for labels: plotters draws text only with a font it has been given.
/// `$BINLLM_FONT` names one; otherwise DejaVu Sans where distributions install it. Without
/// a font the plot is drawn without text, and a warning says how to get labels.
fn register_font() -> bool {
    const CANDIDATES: [&str; 3] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ];
    let from_env = std::env::var("BINLLM_FONT").ok();
    for path in from_env.iter().map(String::as_str).chain(CANDIDATES) {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        if from_env.as_deref() == Some(path) {
            eprintln!("warning: BINLLM_FONT={path} is not a readable TrueType font");
        }
    }
    eprintln!(
        "warning: no TrueType font found (DejaVu Sans or $BINLLM_FONT): the training plot has no labels"
    );
    false
}

pub fn plot(curves: &Curves, title: &str, path: &Path) -> Result<()> {
    let labels = register_font();
    let root = BitMapBackend::new(path, (1100, 650)).into_drawing_area();
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
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(60);
    if labels {
        builder.caption(title, ("sans-serif", 22));
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..max_step, lo..hi)
        .map_err(|e| anyhow!("{e}"))?
        .set_secondary_coord(0f64..max_step, (0.1f64..t_max).log_scale());
    if labels {
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
    }
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
        if labels {
            drawn.label(name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
    }
    let t_color = RGBColor(60, 160, 60);
    let drawn = chart
        .draw_secondary_series(LineSeries::new(
            curves.t.iter().copied(),
            t_color.stroke_width(1),
        ))
        .map_err(|e| anyhow!("{e}"))?;
    if labels {
        drawn
            .label("t (right axis)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], t_color));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}
