//! Progress bars on stderr (indicatif), as the commands and long library
//! passes show them: `{bar} done/total WHAT [elapsed < eta]`.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting `what` (hidden unless `show`; its length is set by
/// [`follow`] or the caller).
pub fn bar(show: bool, what: &str) -> ProgressBar {
    let bar = if show { ProgressBar::new(0) } else { ProgressBar::hidden() };
    let template = format!("{{bar:30}} {{pos}}/{{len}} {what} [{{elapsed_precise}} < {{eta_precise}}]");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// A `progress(done, total)` callback that moves `bar`.
pub fn follow(bar: &ProgressBar) -> impl FnMut(usize, usize) + '_ {
    |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    }
}

/// The bar of a RecordIO header scan (a set without `property`).
pub fn scan_bar(show: bool) -> ProgressBar {
    bar(show, "headers read (no property file)")
}
