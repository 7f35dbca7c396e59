//! Where lake files live: the paths are in [`sluice_columnar::layout`]
//! (re-exported here); the lake root from its configured URL is the
//! lake's own (its error is a [`LakeError`]).

use std::path::{Path, PathBuf};

pub use sluice_columnar::layout::*;

use crate::LakeError;

/// The lake root directory from `lake.url` (`file:///abs/path`, or a plain
/// path; empty means `<data_dir>/lake`).
pub fn root_from_url(url: &str, data_dir: &Path) -> Result<PathBuf, LakeError> {
    if url.is_empty() {
        return Ok(data_dir.join("lake"));
    }
    if let Some(rest) = url.strip_prefix("file://") {
        if rest.is_empty() {
            return Err(LakeError::UrlWithoutPath);
        }
        return Ok(PathBuf::from(rest));
    }
    if url.contains("://") {
        return Err(LakeError::UnsupportedUrl(url.to_owned()));
    }
    Ok(PathBuf::from(url))
}
