//! `kubenet image pull`: the base images the lab's VMs need, downloaded and checked.

use std::io::Write;

use kubenet_cluster::{Arch, Lab};

/// `kubenet image pull [NAME...]`, with a progress bar on a terminal.
pub fn image_pull(lab: &Lab, names: &[String], out: &mut impl Write) -> anyhow::Result<()> {
    use kubenet_vm::image::{self, Pulled};
    for p in image::plan(lab, names, Arch::HOST)? {
        writeln!(out, "{} <- {}", p.path.display(), p.url)?;
        out.flush()?;
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("a valid template"),
        );
        let result = image::pull(&p, |done, total| {
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(done);
        });
        bar.finish_and_clear();
        match result? {
            Pulled::UpToDate => writeln!(out, "  up to date (SHA-256 matches)")?,
            Pulled::Downloaded { bytes, resumed_at: 0 } => {
                writeln!(out, "  downloaded {:.1} MiB, SHA-256 verified", mib(bytes))?
            }
            Pulled::Downloaded { bytes, resumed_at } => writeln!(
                out,
                "  downloaded {:.1} MiB (resumed at {:.1} MiB), SHA-256 verified",
                mib(bytes),
                mib(resumed_at)
            )?,
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}
