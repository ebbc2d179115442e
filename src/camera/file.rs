//! Image files, or a directory of them, as a frame source: once or looped, at a given rate.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use super::{CameraError, Frame, FrameSource, Pacer, SourceInfo};
use crate::monotonic_now_ns;

/// A still image or a directory of images (PNG/JPEG, sorted by name), played once or looped.
pub struct FileSource {
    path: PathBuf,
    files: Vec<PathBuf>,
    looped: bool,
    pacer: Pacer,
    seq: u64,
    stop: Arc<AtomicBool>,
    last_size: (u32, u32),
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        .unwrap_or(false)
}

impl FileSource {
    /// Open `path` (file or directory) at `fps` (0: as fast as asked).
    pub fn open(
        path: &Path,
        looped: bool,
        fps: f32,
        stop: Arc<AtomicBool>,
    ) -> Result<FileSource, CameraError> {
        let no_images = |reason: String| CameraError::NoImages {
            path: path.to_path_buf(),
            reason,
        };
        let files = if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| no_images(e.to_string()))?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            files.sort();
            files
        } else if path.is_file() {
            vec![path.to_path_buf()]
        } else {
            return Err(no_images("no such file or directory".into()));
        };
        if files.is_empty() {
            return Err(no_images("directory has no .png/.jpg/.jpeg files".into()));
        }
        let first = image::image_dimensions(&files[0]).unwrap_or((0, 0));
        Ok(FileSource {
            path: path.to_path_buf(),
            files,
            looped,
            pacer: Pacer::new(fps),
            seq: 0,
            stop,
            last_size: first,
        })
    }
}

impl FrameSource for FileSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, CameraError> {
        let n = self.files.len() as u64;
        if !self.looped && self.seq >= n {
            return Ok(None);
        }
        self.pacer.wait(self.seq, &self.stop);
        let path = &self.files[(self.seq % n) as usize];
        let seq = self.seq;
        self.seq += 1;
        let captured_ns = monotonic_now_ns();
        let started = Instant::now();
        let image = crate::pixel::read_image(path).map_err(|e| CameraError::BadFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.last_size = image.dimensions();
        let frame = Frame::converted_since(seq, captured_ns, image, started);
        Ok(Some(frame))
    }

    fn info(&self) -> SourceInfo {
        SourceInfo {
            uri: format!("file:{}", self.path.display()),
            width: self.last_size.0,
            height: self.last_size.1,
            format: None,
            fps: self.pacer.fps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;

    #[test]
    fn file_source_plays_once_or_loops() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..2 {
            RgbImage::new(8, 6)
                .save(dir.path().join(format!("{i}.png")))
                .unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut once = FileSource::open(dir.path(), false, 0.0, stop.clone()).unwrap();
        assert_eq!(once.next_frame().unwrap().unwrap().seq, 0);
        assert_eq!(once.next_frame().unwrap().unwrap().seq, 1);
        assert!(once.next_frame().unwrap().is_none());
        let mut looped = FileSource::open(dir.path(), true, 0.0, stop.clone()).unwrap();
        for i in 0..5 {
            assert_eq!(looped.next_frame().unwrap().unwrap().seq, i);
        }
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            FileSource::open(empty.path(), true, 0.0, stop),
            Err(CameraError::NoImages { .. })
        ));
    }
}
