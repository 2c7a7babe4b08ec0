//! `runner deregister`: end the job at the gateway and remove the lines.

use super::*;

pub(super) async fn deregister(args: DeregisterArgs) -> Result<ExitCode, Failure> {
    let job = job_id(&args.common).await?;
    let path = state_path(&args.common, &job)?;
    let state = read_state(&path);
    // First stop the refresher, so that nothing re-adds what we remove.
    let _ = std::fs::remove_file(&path);
    let api = job_api(&args.common, state.as_ref())?;
    let told = match api.deregister(&job).await {
        Ok(answer) if answer.deregistered => {
            println!("ci-gateway: job {job} deregistered; its sessions were closed");
            true
        }
        Ok(_) => {
            println!("ci-gateway: job {job} was not (or no longer) registered");
            true
        }
        Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(404 | 410)) => {
            println!("ci-gateway: job {job} was not (or no longer) registered");
            true
        }
        Err(e) => {
            eprintln!("ci-gateway runner: telling the gateway that job {job} ended: {e}");
            false
        }
    };
    let keys_path = match (&args.authorized_keys, &state) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(s)) => Some(s.authorized_keys.clone()),
        (None, None) => {
            let user = args.user.clone().or_else(current_user).unwrap_or_default();
            default_authorized_keys(&user, cfg!(windows))
                .ok()
                .map(|(p, _)| p)
        }
    };
    if let Some(keys_path) = keys_path.filter(|p| p.exists()) {
        match authorized_keys::edit_file(&keys_path, None, |t| Ok(authorized_keys::remove(t, &job)))
        {
            Ok(true) => println!(
                "ci-gateway: removed job {job}'s lines from {}",
                keys_path.display()
            ),
            Ok(false) => {}
            Err(e) => return Err(Failure::from(e)),
        }
    }
    let _ = std::fs::remove_file(path.with_extension("log"));
    Ok(if told {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
