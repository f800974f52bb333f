//! Policy files (or stdin) read within the size limit and parsed.

use std::io::Read;

use weft_policy as policy;

use crate::client::Fail;

/// Reads a policy file (or stdin), at most one byte past
/// [`policy::documents::MAX_FILE_BYTES`]: the parser refuses it then, without this
/// reading gigabytes first.
pub(crate) fn read_input(file: &str) -> Result<(String, String), Fail> {
    let limit = policy::documents::MAX_FILE_BYTES as u64 + 1;
    let mut bytes = Vec::new();
    let name = if file == "-" {
        std::io::stdin().take(limit).read_to_end(&mut bytes).map_err(|e| Fail(1, format!("reading stdin: {e}")))?;
        "<stdin>".to_string()
    } else {
        let f = std::fs::File::open(file).map_err(|e| Fail(1, format!("{file}: {e}")))?;
        f.take(limit).read_to_end(&mut bytes).map_err(|e| Fail(1, format!("{file}: {e}")))?;
        file.to_string()
    };
    let text = if bytes.len() > policy::documents::MAX_FILE_BYTES {
        String::from_utf8_lossy(&bytes).into_owned()
    } else {
        String::from_utf8(bytes).map_err(|e| Fail(1, format!("{name}: not UTF-8 text ({e})")))?
    };
    Ok((name, text))
}

pub(crate) fn parse(file: &str) -> Result<Vec<policy::documents::Located>, Fail> {
    let (name, text) = read_input(file)?;
    match policy::documents::parse(&name, &text) {
        Ok(r) if r.is_empty() => Err(Fail(1, format!("{name}: no resources found"))),
        Ok(r) => Ok(r),
        Err(problems) => Err(Fail(1, problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))),
    }
}
