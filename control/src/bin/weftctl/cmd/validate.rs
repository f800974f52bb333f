//! `weftctl validate -f FILE`: the same checks as apply, offline.

use crate::client::Fail;
use crate::input::parse;
use crate::out;

pub(crate) fn run(file: &str) -> Result<(), Fail> {
    for l in &parse(file)? {
        out!("{} valid", l.resource.id());
    }
    Ok(())
}
