# The ci-gateway action's step on Windows runners: find or fetch
# ci-gateway.exe, start sshd if asked, run `ci-gateway runner <command>`, and
# keep administrators_authorized_keys readable by sshd: ACL'd to
# Administrators and SYSTEM only, by SID so that non-English Windows works
# (DESIGN §9). The agent writes the file as UTF-8 without BOM, never UTF-16.
$ErrorActionPreference = 'Stop'

function Say($text) { [Console]::Error.WriteLine("ci-gateway action: $text") }

$command = $env:CI_GATEWAY_COMMAND
if ($command -notin @('register', 'wait', 'breakpoint', 'deregister')) {
    Say "input 'command' must be register, wait, breakpoint or deregister (got '$command')"
    exit 2
}

# Inputs left empty mean "the agent's default", not "empty".
Get-ChildItem env: | Where-Object { $_.Name -like 'CI_GATEWAY_*' -and $_.Value -eq '' } |
    ForEach-Object { Remove-Item "env:$($_.Name)" }

$tempRoot = if ($env:RUNNER_TEMP) { $env:RUNNER_TEMP } else { $env:TEMP }
$binDir = Join-Path $tempRoot 'ci-gateway\bin'
$exe = Join-Path $binDir 'ci-gateway.exe'
New-Item -ItemType Directory -Force -Path $binDir | Out-Null

if ($env:CI_GATEWAY_BINARY) {
    Copy-Item -Force $env:CI_GATEWAY_BINARY $exe
} elseif (-not (Test-Path $exe)) {
    $arm = $env:PROCESSOR_ARCHITECTURE -eq 'ARM64'
    if ($env:CI_GATEWAY_DOWNLOAD_URL) {
        $target = if ($arm) { 'aarch64-pc-windows-msvc' } else { 'x86_64-pc-windows-msvc' }
        $url = $env:CI_GATEWAY_DOWNLOAD_URL.Replace('{target}', $target)
        Say "downloading $url"
        Invoke-WebRequest -UseBasicParsing -Uri $url -OutFile "$exe.tmp" -TimeoutSec 120
        Move-Item -Force "$exe.tmp" $exe
    } else {
        # From the gateway this job registers with (agent and gateway match),
        # checked against its SHA-256 and kept in the tool cache by it.
        # A private CA (ca-cert) must be trusted by Windows itself here.
        $platform = if ($arm) { 'windows-aarch64' } else { 'windows-x86_64' }
        $base = "$($env:CI_GATEWAY_URL.TrimEnd('/'))/v1/agent/$platform"
        $line = (Invoke-WebRequest -UseBasicParsing -Uri "$base.sha256" -TimeoutSec 60).Content
        if ($line -is [byte[]]) { $line = [Text.Encoding]::ASCII.GetString($line) }
        $sum = ($line -split '\s+')[0].ToLowerInvariant()
        if ($sum -notmatch '^[0-9a-f]{64}$') {
            Say "$base.sha256 is not a SHA-256 checksum line"
            exit 1
        }
        $cacheRoot = if ($env:RUNNER_TOOL_CACHE) { $env:RUNNER_TOOL_CACHE } else { Join-Path $binDir 'cache' }
        $cached = Join-Path $cacheRoot "ci-gateway\$sum\ci-gateway.exe"
        if ((Test-Path $cached) -and ((Get-FileHash -Algorithm SHA256 $cached).Hash.ToLowerInvariant() -eq $sum)) {
            Say "using the agent from the tool cache ($cached)"
            Copy-Item -Force $cached $exe
        } else {
            Say "downloading the agent from $base"
            Invoke-WebRequest -UseBasicParsing -Uri $base -OutFile "$exe.tmp" -TimeoutSec 300
            $got = (Get-FileHash -Algorithm SHA256 "$exe.tmp").Hash.ToLowerInvariant()
            if ($got -ne $sum) {
                Remove-Item -Force "$exe.tmp"
                Say "the agent from $base has SHA-256 $got, not the $sum the gateway published; refusing to run it"
                exit 1
            }
            New-Item -ItemType Directory -Force -Path (Split-Path $cached) | Out-Null
            Copy-Item -Force "$exe.tmp" $cached
            Move-Item -Force "$exe.tmp" $exe
        }
    }
}

$keys = if ($env:CI_GATEWAY_AUTHORIZED_KEYS) { $env:CI_GATEWAY_AUTHORIZED_KEYS } else {
    Join-Path $env:ProgramData 'ssh\administrators_authorized_keys'
}

if ($command -eq 'register' -and $env:CI_GATEWAY_START_SSHD -ne 'false') {
    $service = Get-Service -Name sshd -ErrorAction SilentlyContinue
    if (-not $service) {
        Say 'installing the OpenSSH server (Windows capability)'
        Add-WindowsCapability -Online -Name OpenSSH.Server~~~~0.0.1.0 | Out-Null
    }
    # sshd generates its host keys on first start; register reads them.
    Start-Service sshd
}

& $exe runner $command
$code = $LASTEXITCODE

if ($command -eq 'register' -and (Test-Path $keys)) {
    # Administrators (S-1-5-32-544) and SYSTEM (S-1-5-18) only.
    icacls $keys /inheritance:r /grant '*S-1-5-32-544:F' /grant '*S-1-5-18:F' | Out-Null
}
exit $code
