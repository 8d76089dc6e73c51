//! `--save`: annotated frames to one MJPEG file (`.mjpeg`/`.mjpg`: concatenated JPEGs, which
//! `coca stream`, ffmpeg and VLC read back) or to a folder of numbered JPEG files. Each frame is
//! flushed as it is written, so a stopped or killed process leaves every frame before it intact.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub enum SaveTo {
    Mjpeg { path: PathBuf, file: BufWriter<File> },
    Folder { dir: PathBuf },
}

impl SaveTo {
    /// `path` ending in `.mjpeg`/`.mjpg` is one file (created or truncated); anything else is a
    /// folder (created if needed) that receives `frame_NNNNNN.jpg`.
    pub fn create(path: &Path) -> Result<SaveTo> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        if ext == "mjpeg" || ext == "mjpg" {
            let file = File::create(path).map_err(|e| Error::io(path, e))?;
            Ok(SaveTo::Mjpeg { path: path.to_path_buf(), file: BufWriter::new(file) })
        } else if !ext.is_empty() && path.extension().is_some() && !path.is_dir() {
            Err(Error::InvalidArgument(format!("--save {}: give a .mjpeg file or a folder", path.display())))
        } else {
            std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
            Ok(SaveTo::Folder { dir: path.to_path_buf() })
        }
    }

    /// Write one JPEG (`frame` names it in a folder).
    pub fn write(&mut self, jpeg: &[u8], frame: u64) -> Result<()> {
        match self {
            SaveTo::Mjpeg { path, file } => file.write_all(jpeg).and_then(|_| file.flush()).map_err(|e| Error::io(&*path, e)),
            SaveTo::Folder { dir } => {
                let p = dir.join(format!("frame_{frame:06}.jpg"));
                std::fs::write(&p, jpeg).map_err(|e| Error::io(p, e))
            }
        }
    }
}
