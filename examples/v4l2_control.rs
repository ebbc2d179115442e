//! List or set the controls of a V4L2 device by name, like a tiny `v4l2-ctl`.
//!
//! ```text
//! v4l2_control /dev/video0                 # list controls: id, type, name, range
//! v4l2_control /dev/video0 Disconnect      # press a button control
//! v4l2_control /dev/video0 Brightness=100  # set an integer, boolean or menu control
//! ```
//!
//! The VM camera test (`cross/vm/`) uses it to press the `vivid` driver's "Disconnect" button,
//! which makes the device act as an unplugged USB camera until every file handle is closed.

use std::process::ExitCode;

use v4l::control::{Control, Description, Type, Value};
use v4l::Device;

fn describe(c: &Description) -> String {
    format!(
        "0x{:08x} {:?} {:?} [{}..{}] default {}",
        c.id, c.typ, c.name, c.minimum, c.maximum, c.default
    )
}

fn run(args: &[String]) -> Result<(), String> {
    let (path, assignment) = match args {
        [path] => (path, None),
        [path, assignment] => (path, Some(assignment)),
        _ => return Err("usage: v4l2_control DEVICE [NAME[=VALUE]]".into()),
    };
    let device = Device::with_path(path).map_err(|e| format!("cannot open {path}: {e}"))?;
    let controls = device
        .query_controls()
        .map_err(|e| format!("{path}: cannot list controls: {e}"))?;
    let Some(assignment) = assignment else {
        for c in &controls {
            println!("{}", describe(c));
        }
        return Ok(());
    };
    let (name, value) = match assignment.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (assignment.as_str(), None),
    };
    let control = controls
        .iter()
        .find(|c| c.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| format!("{path}: no control named {name:?}"))?;
    let value = match (control.typ, value) {
        (Type::Button, _) => Value::None,
        (Type::Boolean, Some(v)) => Value::Boolean(matches!(v, "1" | "true" | "on")),
        (Type::Integer | Type::Integer64 | Type::Menu | Type::IntegerMenu, Some(v)) => {
            Value::Integer(v.parse().map_err(|e| format!("value {v:?}: {e}"))?)
        }
        (typ, None) => return Err(format!("control {name:?} ({typ:?}) needs =VALUE")),
        (typ, Some(_)) => return Err(format!("control {name:?}: type {typ:?} not supported")),
    };
    device
        .set_control(Control {
            id: control.id,
            value,
        })
        .map_err(|e| format!("{path}: cannot set {name:?}: {e}"))?;
    println!("set {}", describe(control));
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("v4l2_control: {e}");
            ExitCode::FAILURE
        }
    }
}
